"""Rewrites of an exported graph into equivalent standard-ONNX forms that runtimes run faster.

Both are exact rewrites in standard ONNX ops (TensorRT and ONNX Runtime read them alike); they run on
every exported component, before fp16 conversion and quantization:

- `rsqrt_as_div`: `x * Reciprocal(Sqrt(v))` (how torch exports `x * torch.rsqrt(v)`, the RMSNorm of
  every decoder here) becomes `x / Sqrt(v)`, the form ONNX Runtime's SimplifiedLayerNormFusion
  recognises: each RMSNorm's seven nodes become one kernel.
- `fuse_sibling_matmuls`: MatMuls that multiply the same activation by different stored weights (the
  q/k/v projections, gate/up) become one MatMul over the weights concatenated along N and a Split.
  At batch 1 a decode step reads every weight once; a narrow projection (a 2-KV-head k_proj is 128
  columns) is too small to keep the cores busy, and one wide MatMul reads the same bytes in one
  kernel. Weight-only quantization is block-wise along K, so the fused weight quantizes to the same
  codes as the separate ones.

Measured on qwen2-vl-small (README, Benchmarks).
"""
from __future__ import annotations

from collections import defaultdict


def optimize_graph(model) -> dict[str, int]:
    """Apply every rewrite to `model` (weights loaded) in place; returns how many times each applied."""
    return {"rsqrt_as_div": rsqrt_as_div(model.graph), "fused_matmuls": fuse_sibling_matmuls(model.graph)}


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def rsqrt_as_div(graph) -> int:
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    drop, count = set(), 0
    for rec in graph.node:
        if rec.op_type != "Reciprocal" or rec.output[0] in graph_outputs:
            continue
        sqrt = producer.get(rec.input[0])
        users = consumers.get(rec.output[0], [])
        if sqrt is None or sqrt.op_type != "Sqrt" or not users or any(u.op_type != "Mul" or len(set(u.input)) != 2 for u in users):
            continue
        for mul in users:
            other = mul.input[0] if mul.input[1] == rec.output[0] else mul.input[1]
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([other, sqrt.output[0]])
        drop.add(id(rec))
        count += 1
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return count


def fuse_sibling_matmuls(graph) -> int:
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = defaultdict(list)
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and n.input[0] not in inits:
            w = inits[n.input[1]]
            if len(w.dims) == 2:
                groups[(n.input[0], w.dims[0], w.data_type)].append(n)
    fused = {}
    used = {i for n in graph.node for i in n.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    count = 0
    for (x, _k, _dtype), nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        base = fresh(f"{nodes[0].name or 'matmul'}_fused{len(nodes)}")
        w_name, y_name, s_name = fresh(base + ".weight"), fresh(base + ".out"), fresh(base + ".split")
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), w_name))
        graph.initializer.append(numpy_helper.from_array(np.asarray([w.shape[1] for w in weights], dtype=np.int64), s_name))
        matmul = helper.make_node("MatMul", [x, w_name], [y_name], name=base)
        split = helper.make_node("Split", [y_name, s_name], [n.output[0] for n in nodes], name=fresh(base + "/split"), axis=-1)
        fused[id(nodes[0])] = [matmul, split]
        for n in nodes[1:]:
            fused[id(n)] = []
        count += 1
    if not count:
        return 0
    new_nodes = []
    for n in graph.node:
        new_nodes.extend(fused.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    still = {i for n in graph.node for i in n.input}
    stale = [t for t in graph.initializer if t.name in used and t.name not in still]
    for t in stale:
        graph.initializer.remove(t)
    return count
