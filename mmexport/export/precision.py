"""fp16 graphs with fp32 islands.

Weights and matmuls go to fp16; the numerically fragile ops stay fp32: normalization (LayerNorm, and
RMSNorm's Pow/ReduceMean/Sqrt/Reciprocal/Div), softmax, and the rotary math (Cos/Sin and the position
products). The graph's inputs and outputs keep their declared dtypes (fp32), so the runtime, the
manifest and verify see the same interface at every precision; the converter inserts the casts.
"""
from __future__ import annotations

from pathlib import Path

from ..spec import ComponentSpec

# op types kept in fp32 (the "islands")
FP32_OPS = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Softmax",
    "Cos",
    "Sin",
    "Range",
    "CumSum",
]


def convert_fp16(onnx_path: Path, spec: ComponentSpec) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=False)
    _toposort(model.graph)  # the converter appends its I/O casts at the end of the node list
    # the converter leaves stale value_info types behind; drop them and prove the types are consistent
    del model.graph.value_info[:]
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    data = onnx_path.name + ".data"
    (onnx_path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    onnx.checker.check_model(str(onnx_path))


def _toposort(graph) -> None:
    """Order nodes so every input is produced before it is used (stable for already-sorted parts)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    produced: set[str] = set()
    while pending:
        rest = []
        for n in pending:
            if n.op_type == "Cast" and n.output and all(o in produced for o in n.output):
                continue  # the converter emits one cast per use of a shared initializer; keep the first
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                produced.update(n.output)
            else:
                rest.append(n)
        if rest and len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
