"""One component -> one ONNX graph, with torch.onnx.export (dynamo) and the component's declaration.

The declaration gives the input/output names and the dynamic dims (torch.export.Dim with the
declared min/max, multiples and sums); weights go to an external-data file named after the
component, so names never collide; `onnx.checker` runs on the result (with its external data).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from ..spec import ComponentSpec, Dim
from ..families.base import ExportComponent


def _export_dims(spec: ComponentSpec) -> dict[str, Any]:
    """torch.export.Dim objects for every declared dim (derived ones as sums, multiples as k*base)."""
    from torch.export import Dim as TDim

    out: dict[str, Any] = {}
    for name, d in spec.dims.items():
        if d.derived or d.min == d.max:
            continue
        if d.multiple > 1:
            base = TDim(f"{name}_blocks", min=max(1, d.min // d.multiple), max=d.max // d.multiple)
            out[name] = d.multiple * base
        else:
            # the tracer's own lower bound is 0 or 1 for any dim; the declared range is kept by the spec
            out[name] = TDim(name, min=d.min, max=d.max)
    for name, d in spec.dims.items():
        if d.derived:
            # torch.export expresses only `k*dim + c`; a sum of dims is left for the tracer to infer
            out[name] = TDim.AUTO
    return out


def dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, Any] | None, ...]:
    dims = _export_dims(spec)
    shapes = []
    for t in spec.inputs:
        axes = {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims}
        shapes.append(axes or None)
    return tuple(shapes)


def export_component(comp: ExportComponent, out_dir: Path, opset: int, log=print) -> Path:
    """Export `comp` to out_dir/<name>.onnx (+ <name>.onnx.data); returns the .onnx path."""
    import onnx
    import torch

    spec = comp.spec
    onnx_path = out_dir / f"{spec.name}.onnx"
    args = tuple(comp.example[n] for n in spec.input_names)
    shapes = dynamic_shapes(spec)
    # torch.export wants `dynamic_shapes` shaped like the signature: a `*rest` parameter is one tuple (none
    # when the call passes nothing to it)
    params = list(inspect.signature(comp.module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL and len(shapes) >= len(params):
        k = len(params) - 1
        shapes = (*shapes[:k], tuple(r or {} for r in shapes[k:]))
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            comp.module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(onnx_path), external_data=True)
    _rename_external_data(onnx_path, spec)
    onnx.checker.check_model(str(onnx_path), full_check=False)
    _check_io(onnx_path, spec)
    from .shapecheck import check_other_shape

    check_other_shape(comp.module, spec, comp.example, onnx_path, log=log)  # a traced size baked in fails here
    return onnx_path


def _name_dims(model, spec: ComponentSpec) -> None:
    """Give the graph's dynamic I/O axes the declaration's dim names (the tracer invents s0, s53...)."""
    for vi, t in [*zip(model.graph.input, spec.inputs), *zip(model.graph.output, spec.outputs)]:
        for axis, want in zip(vi.type.tensor_type.shape.dim, t.shape):
            if isinstance(want, str):
                axis.dim_param = want


def _strip_trace_metadata(model) -> None:
    """Drop the exporter's per-node debugging metadata (Python stack traces with the build machine's paths, FX
    nodes, module scopes): it carries nothing a runtime reads and made up most of a decoder's .onnx file."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            del node.metadata_props[:]
            for a in node.attribute:
                if a.g.node:
                    graphs.append(a.g)
                graphs.extend(a.graphs)


def _rename_external_data(onnx_path: Path, spec: ComponentSpec) -> None:
    """Name the dims, apply graphopt's rewrites, and keep the weights in exactly one file named
    `<component>.onnx.data`."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    want = onnx_path.name + ".data"
    model = onnx.load(str(onnx_path), load_external_data=True)
    _name_dims(model, spec)
    _strip_trace_metadata(model)
    from .graphopt import optimize_graph

    optimize_graph(model)  # exact standard-ONNX rewrites runtimes run faster (fused RMSNorm, sibling MatMuls)
    stale = {
        e.value
        for init in model.graph.initializer
        for e in init.external_data
        if e.key == "location"
    }
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=want, size_threshold=1024)
    for f in stale - {want}:
        (onnx_path.parent / f).unlink(missing_ok=True)
    (onnx_path.parent / want).unlink(missing_ok=True)
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True, location=want, size_threshold=1024)


def _check_io(onnx_path: Path, spec: ComponentSpec) -> None:
    """The graph's inputs/outputs must be exactly the declared ones, in order, with declared dtypes."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    to_np = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
             onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16"}
    got_in = [(i.name, to_np.get(i.type.tensor_type.elem_type)) for i in m.graph.input]
    got_out = [(o.name, to_np.get(o.type.tensor_type.elem_type)) for o in m.graph.output]
    want_in = [(t.name, t.dtype) for t in spec.inputs]
    want_out = [(t.name, t.dtype) for t in spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(f"{spec.name}: exported I/O {got_in} -> {got_out} differs from the declaration {want_in} -> {want_out}")


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress to stdout; stdout is for data, so keep it away."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
