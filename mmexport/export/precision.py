"""fp16 graphs with fp32 islands.

Weights and matmuls go to fp16; the numerically fragile ops stay fp32: normalization (LayerNorm, and
RMSNorm's Pow/ReduceMean/Sqrt/Reciprocal/Div), softmax, the rotary math (Cos/Sin and the position
products), and the distances an ArgMin/ArgMax picks from (a VQ tokenizer's nearest codebook entry). The
graph's inputs and outputs keep their declared dtypes (fp32), so the runtime, the manifest and verify see
the same interface at every precision; the converter inserts the casts.
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


# the ops of a decomposed RMSNorm between its Pow(x, 2) and the Mul(x, rsqrt(...))
_NORM_CHAIN = {"ReduceMean", "Add", "Sqrt", "Reciprocal", "Div"}


def fp32_islands(graph) -> list[str]:
    """Names of nodes that must compute in fp32 beyond the op types in FP32_OPS.

    - Each decomposed RMSNorm from `Pow(x, 2)` through `x * rsqrt(mean + eps)`: x² and its mean
      overflow fp16 (max 65504) as soon as |x| > 256, which real residual streams exceed; the
      normalized product is back in range, so the weight multiply after it may be fp16.
    - Everything upstream of Cos/Sin: the rotary angles (position x inverse frequency) and the cast of
      the integer positions, which fp16 cannot hold exactly past 2048.
    """
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: set[str] = set()
    for pw in (n for n in graph.node if n.op_type == "Pow"):
        chain, cur = [pw], pw
        while True:
            nxt = consumers.get(cur.output[0], [])
            if len(nxt) != 1:
                break
            cur = nxt[0]
            chain.append(cur)
            if cur.op_type == "Mul" or cur.op_type not in _NORM_CHAIN:
                break
        if chain[-1].op_type == "Mul" and any(c.op_type == "ReduceMean" for c in chain):
            keep.update(n.name for n in chain)
    stack = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    while stack:
        n = stack.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        stack.extend(producer[i] for i in n.input if i in producer)
    # - The distances an ArgMin / ArgMax chooses by (a VQ image tokenizer's nearest codebook entry:
    #   ||z||² + ||e||² - 2 z·e): fp16 cancellation and rounding would pick other entries. The ArgMin and the
    #   arithmetic back to the tensors it is computed from stay fp32 (those tensors themselves may be fp16).
    picks = [n for n in graph.node if n.op_type in ("ArgMin", "ArgMax")]
    keep.update(n.name for n in picks)
    stack = [producer[i] for n in picks for i in n.input if i in producer]
    while stack:
        n = stack.pop()
        if n.name in keep or n.op_type not in _DISTANCE_OPS:
            continue
        keep.add(n.name)
        stack.extend(producer[i] for i in n.input if i in producer)
    return sorted(keep)


# the arithmetic of a distance that an ArgMin / ArgMax reads (see fp32_islands)
_DISTANCE_OPS = {"Add", "Sub", "Mul", "MatMul", "Gemm", "ReduceSum", "Pow", "Transpose", "Neg"}


def convert_fp16(onnx_path: Path, spec: ComponentSpec) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path), load_external_data=True)
    islands = fp32_islands(model.graph)
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=islands, disable_shape_infer=False
    )
    _toposort(model.graph)  # the converter appends its I/O casts at the end of the node list
    _drop_cast_round_trips(model.graph)  # fp32 -> fp16 -> fp32 between two islands would round (and overflow)
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


def _drop_cast_round_trips(graph) -> None:
    """Remove Cast(fp16) whose every consumer is a Cast(fp32): those consumers read the fp32 value."""
    from onnx import TensorProto

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dead = set()
    for n in graph.node:
        if cast_to(n) != TensorProto.FLOAT16 or n.output[0] in outputs:
            continue
        users = consumers.get(n.output[0], [])
        if users and all(cast_to(u) == TensorProto.FLOAT for u in users) and not any(u.output[0] in outputs for u in users):
            dead.add(id(n))
            for u in users:
                dead.add(id(u))
                rename[u.output[0]] = n.input[0]
    if not rename:
        return
    keep = [n for n in graph.node if id(n) not in dead]
    for n in keep:
        for k, i in enumerate(n.input):
            while i in rename:
                i = rename[i]
            n.input[k] = i
    del graph.node[:]
    graph.node.extend(keep)
