"""Backends: each component runs in a runner with one small interface (after Polygraphy's runners):
`activate()`, `infer(feed) -> dict`, `deactivate()`; feeds are checked against the component's
declaration before they reach the engine.

ONNX Runtime lives here; the TensorRT runner shares the interface. Heavy modules are imported when a
runner is activated, so this module imports with neither installed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..spec import ComponentSpec


class Runner:
    """`path`: the component's graph; `spec`: its declaration; `manifest`: the artifact's loaded manifest (the
    pipeline passes the one it has: a runner that needs more of the artifact, such as the TensorRT runner
    finding its engine, reads it there instead of loading it again)."""

    # the decoder is fed the whole preallocated KV cache (fixed shapes: TensorRT profiles, CUDA graphs), or only
    # its filled slots (runtime.pipeline.KVCache)
    whole_cache = True

    def __init__(self, path: Path, spec: ComponentSpec, manifest: Any = None):
        self.path = Path(path)
        self.spec = spec
        self.manifest = manifest
        self.active = False
        self.calls = 0  # inferences run (bench and tests show which stages a decode step touches)
        self.seconds = 0.0  # wall time spent in them (each runner times its own inferences, as Polygraphy's do)
        self.check_seconds = 0.0  # wall time spent checking feeds against the declaration, before them

    def activate(self) -> "Runner":
        self.active = True
        return self

    def deactivate(self) -> None:
        self.active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"runner for {self.spec.name} is not active")
        t0 = time.perf_counter()
        try:
            self.spec.check_feed(feed)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.check_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self._infer(feed)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_graph_io(spec: ComponentSpec, path: Path, inputs: list, outputs: list) -> None:
    """Refuse a graph whose inputs/outputs differ from its declaration (names, dtypes, ranks, fixed sizes),
    when its session is created: one line naming the component, instead of an error mid-request.
    `inputs`/`outputs`: (name, ONNX Runtime type string, shape) per graph tensor."""
    for kind, declared, graph in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs)):
        got = {name: (_ORT_TYPES.get(t, t), list(shape or [])) for name, t, shape in graph}
        want = {t.name: t for t in declared}
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise UserError(f"{path}: component {spec.name}: the graph's {kind}s differ from its declaration "
                            f"(missing {missing or 'none'}, unexpected {extra or 'none'}); the graph does not belong to this manifest, rebuild")
        for name, t in want.items():
            dtype, shape = got[name]
            fixed_ok = all(not (isinstance(g, int) and isinstance(d, int)) or g == d for g, d in zip(shape, t.shape))
            if dtype != t.dtype or len(shape) != len(t.shape) or not fixed_ok:
                raise UserError(f"{path}: component {spec.name}: graph {kind} {name} is {dtype} {shape}, declared "
                                f"{t.dtype} {list(t.shape)}; the graph does not belong to this manifest, rebuild")


def ort_spinning(component: str) -> bool:
    """Whether a component's ONNX Runtime thread pool may spin between its kernels and runs.

    MMEXPORT_ORT_SPINNING=1: every component's; =0: none; unset: the decoder's alone. A decode step is
    hundreds of short kernels back to back, and a pool whose workers sleep between them pays a wake-up
    for each; the other components run a few large kernels once per request, and their pools' spinning
    would only take cores from the next component's run (each session has its own pool)."""
    v = os.environ.get("MMEXPORT_ORT_SPINNING", "")
    return component == "decoder" if v == "" else v != "0"


def ort_session_options(component: str, threads: int | None = None):
    """The session options every component's ONNX Runtime session gets (threads: MMEXPORT_THREADS, else ONNX
    Runtime's default of one per physical core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("MMEXPORT_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # A pipeline holds one session per component, each with its own intra-op thread pool, and runs
    # them one after another. With ORT's default (spinning everywhere), a finished session's workers
    # keep spinning for a while and take the cores from the next session's run; with spinning off
    # everywhere, the decoder's workers sleep and wake between a step's ~1,200 kernels. Measured on
    # qwen2-vl-small (2-core CPU): all spinning -> none: TTFT 4.4 s -> 3.2 s (an earlier round); none ->
    # the decoder's alone (ort_spinning): int4 decode 40.1 -> 47.0 tok/s, TTFT unchanged (README, Benchmarks).
    spin = "1" if ort_spinning(component) else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


class OrtRunner(Runner):
    """An ONNX Runtime session for one component."""

    # any cache_len runs: attention over the filled slots only. Measured on qwen2-vl-small int4, 288 prompt
    # tokens + 64 (2-core CPU): decode 48.4 -> 53.6 tok/s against the whole 1,024-slot buffer.
    whole_cache = False

    def __init__(self, path: Path, spec: ComponentSpec, manifest: Any = None, providers: list[str] | None = None,
                 threads: int | None = None, profile_prefix: Path | str | None = None):
        super().__init__(path, spec, manifest)
        self.providers = providers
        self.threads = threads
        self.profile_prefix = profile_prefix  # ONNX Runtime's per-kernel profiler on (bench --profile)
        self.session = None

    def activate(self) -> "OrtRunner":
        import onnxruntime as ort

        so = ort_session_options(self.spec.name, self.threads)
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = str(self.profile_prefix)
        providers = self.providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:  # a corrupt or foreign graph is a problem of the artifact, not a crash
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(f"{self.path}: ONNX Runtime cannot load component {self.spec.name} ({msg}); rebuild") from None
        check_graph_io(self.spec, self.path, [(i.name, i.type, i.shape) for i in self.session.get_inputs()],
                       [(o.name, o.type, o.shape) for o in self.session.get_outputs()])
        self._outputs = [o.name for o in self.session.get_outputs()]
        return super().activate()

    def end_profiling(self) -> str:
        """Stop the profiler (runner made with `profile_prefix`); returns the path of its JSON trace."""
        return self.session.end_profiling()

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._outputs, feed)
        return dict(zip(self._outputs, outs))


class PhasedRunner(Runner):
    """One component with two graphs of one declaration: `prefill` runs feeds of more than one position along the
    spec's `seq_len` dim (a prompt), `decode` the rest (one token per row). A build makes the second graph with
    `--prefill-quant-method dynamic`: int8 integer GEMMs where a prompt's many rows make the MatMuls compute-bound,
    beside the block-wise graph that reads fewer bytes per token."""

    def __init__(self, decode: Runner, prefill: Runner):
        super().__init__(decode.path, decode.spec, decode.manifest)
        self.decode, self.prefill = decode, prefill
        self.whole_cache = decode.whole_cache and prefill.whole_cache
        # where seq_len is read: the first input that declares it
        self._seq = next(((t.name, list(t.shape).index("seq_len")) for t in decode.spec.inputs if "seq_len" in t.shape), None)
        if self._seq is None:
            raise UserError(f"component {decode.spec.name}: a prefill graph needs a seq_len dim in its inputs")

    def activate(self) -> "PhasedRunner":
        self.decode.activate()
        self.prefill.activate()
        return super().activate()

    def deactivate(self) -> None:
        self.decode.deactivate()
        self.prefill.deactivate()
        super().deactivate()

    def runner_for(self, feed: dict[str, np.ndarray]) -> Runner:
        name, axis = self._seq
        return self.prefill if feed[name].shape[axis] > 1 else self.decode

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.runner_for(feed)
        t0 = time.perf_counter()
        out = r._infer(feed)  # the feed was checked once, against the one declaration
        r.seconds += time.perf_counter() - t0
        r.calls += 1
        return out


def component_runner(backend: str, manifest: Any, name: str, spec: ComponentSpec, **kw) -> Runner:
    """The runner of component `name` of a loaded manifest: its graph's, or a PhasedRunner where the build made a
    graph for prompts beside it (ONNX Runtime: a quantized build; TensorRT builds have none)."""
    runner = make_runner(backend, manifest.component_file(name), spec, manifest=manifest, **kw)
    prefill = manifest.prefill_file(name)
    if prefill is None or backend != "ort":
        return runner
    return PhasedRunner(runner, make_runner(backend, prefill, spec, manifest=manifest, **kw))


# name -> "module:class"; imported when asked for (trt.py imports Runner from this module)
BACKENDS: dict[str, str] = {
    "ort": "mmexport.runtime.backends:OrtRunner",
    "trt": "mmexport.runtime.trt:TrtRunner",  # NVIDIA TensorRT or TensorRT-RTX engines
}


def make_runner(backend: str, path: Path, spec: ComponentSpec, **kw) -> Runner:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    import importlib

    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(path, spec, **kw)
