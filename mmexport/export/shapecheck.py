"""Run every exported graph at sizes other than the traced ones before the build calls it done.

A graph can export "fine" and still have baked a traced size in (an image count, a split size, a sequence
length the tracer specialized): it then fails, or silently computes something else, at any other size.
`check_other_shape` picks, for every dynamic dim of the component's declaration, a size different from the
traced example's (within the declared range and multiple; the decoder's cache axis goes to 0, the empty
cache of a request's first prefill), runs the ONNX graph in ONNX Runtime on random inputs of those sizes and
compares each output with the torch module's on the same inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..spec import ComponentSpec

# above this many bytes of weights the torch module and an ORT session of the graph do not both fit
# comfortably next to the loaded checkpoint: the graph then only has to run at the other sizes
COMPARE_MAX_BYTES = 2 << 30


def _example_sizes(spec: ComponentSpec, example: dict[str, Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                sizes[d] = int(example[t.name].shape[axis])
    return sizes


def other_sizes(spec: ComponentSpec, traced: dict[str, int]) -> dict[str, int] | None:
    """A size per dim, each different from the traced one where its range allows; None if nothing can vary."""
    out: dict[str, int] = {}
    varied = False
    for name, d in spec.dims.items():
        if d.derived:
            continue
        was = traced.get(name, d.opt)
        options = [v for v in range(d.min, d.max + 1, d.multiple) if v % d.multiple == 0]
        if name == "cache_len" and 0 in options and was != 0:
            pick = 0  # the empty cache: the first prefill's zero-length views
        else:
            # the nearest other size, small first (cheap), never 1 when avoidable (1 broadcasts)
            others = sorted((v for v in options if v != was), key=lambda v: (v == 1, abs(v - was), v))
            pick = others[0] if others else was
        varied |= pick != was
        out[name] = pick
    for name, d in spec.dims.items():
        if d.derived:
            out[name] = sum(out[n] for n in d.derived)
    return out if varied else None


def random_feed(spec: ComponentSpec, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the declared dtypes and these sizes: floats ~ N(0, 0.5), integers 0 (a valid id, position,
    mask value or index for every input of every family)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype.startswith("float"):
            feed[t.name] = (rng.standard_normal(shape) * 0.5).astype(t.dtype)
        else:
            feed[t.name] = np.zeros(shape, dtype=t.dtype)
    return feed


def check_other_shape(module, spec: ComponentSpec, example: dict[str, Any], onnx_path: Path, log=print) -> dict[str, Any] | None:
    """Raise UserError when the graph fails or disagrees with the torch module at other sizes."""
    import onnxruntime as ort

    sizes = other_sizes(spec, _example_sizes(spec, example))
    if sizes is None:
        return None
    feed = random_feed(spec, sizes)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    except Exception as e:  # ORT's shape errors: a size baked into the graph
        raise UserError(f"{spec.name}: the exported graph does not run at other sizes than the traced ones "
                        f"({_dims(sizes)}): {str(e).splitlines()[0][:300]}") from None
    weights = sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*"))
    if weights > COMPARE_MAX_BYTES:
        log(f"{spec.name}: runs at {_dims(sizes)} (too large to also compare with torch here)")
        return {"sizes": sizes, "compared": False}
    import torch

    with torch.no_grad():
        ref = module(*[torch.from_numpy(feed[n]) for n in spec.input_names])
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    worst = 0.0
    for name, r in zip(spec.output_names, ref):
        r = r.detach().float().numpy()
        g = got[name].astype(np.float32)
        if g.shape != r.shape:
            raise UserError(f"{spec.name}.{name}: shape {g.shape} at {_dims(sizes)}, torch gives {r.shape} (a traced size is baked in)")
        if r.size:
            err = float(np.abs(g - r).max() / max(1.0, float(np.abs(r).max())))
            worst = max(worst, err)
            if not err <= 1e-3:
                raise UserError(f"{spec.name}.{name}: the graph disagrees with torch at {_dims(sizes)} "
                                f"(max error {err:.3g} relative to the output's range): a traced size is baked in")
    return {"sizes": sizes, "compared": True, "max_rel_err": worst}


def _dims(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())
