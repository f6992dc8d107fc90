"""Weight quantization of an exported graph (int8 / int4), with ONNX Runtime's own tools.

Two methods (QUANT_METHODS): block-wise weight-only (below, the default) and, at 8 bits, dynamic
quantization (integer GEMMs; see QUANT_METHODS).

Every MatMul whose B input is a constant 2-D weight becomes a `com.microsoft::MatMulNBits` node
(ONNX Runtime's `MatMulNBitsQuantizer`, round-to-nearest, blocks of `block_size` along K, one fp
scale per block, symmetric by default). Activations stay float, so the graph's inputs and outputs
keep their names and dtypes and the runtime feeds it exactly as before.

Before the quantizer runs, the graph is normalized so it sees every projection weight:
  - `Gemm(A, W, C)` (what the exporter writes for a 2-D `nn.Linear`, e.g. the vision encoder's
    qkv/proj/fc1/fc2 with `transB=1`) becomes `MatMul(A, W')` + bias, `W'` the [K, N] weight;
    after quantization the bias moves into MatMulNBits' own `bias` input (one node, as before);
  - `MatMul(A, Transpose(W))` with `W` an initializer gets the transposed weight folded in.
The dynamo exporter already stores the decoder's weights as plain [K, N] initializers.

The embedding table (a `Gather` on a constant 2-D table, the `embed_tokens` graph) can be quantized
too (`quantize_embeddings`) to `com.microsoft::GatherBlockQuantized`: at 4 bits by ONNX Runtime's
quantizer (int4 data, IR version 10; the graph keeps its opset), at 8 bits here (uint8 data, the
op's 8-bit layout; ONNX Runtime's quantizer only does 4-bit Gathers).

The quantized graphs need ONNX Runtime (CPU, CUDA, DirectML, WebGPU EPs implement the contrib ops);
TensorRT's ONNX parser does not know the `com.microsoft` domain.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

QUANT_NAMES = {"int8": 8, "int4": 4}
SUPPORTED_BITS = (4, 8)  # MatMulNBitsQuantizer also packs 2 bits; the CPU kernels and the tests cover 4 and 8
# "blockwise": MatMulNBits (weight-only, block scales; best where weights are read once per token: decode).
# "dynamic" (8 bits only): ONNX Runtime's quantize_dynamic, per-channel int8 weights and activations quantized
# per tensor at run time, so the product runs in MLAS's u8s8 integer GEMM (VNNI where the CPU has it): made for
# what multiplies many rows by each weight (prefill, vision towers). Standard ONNX ops (DynamicQuantizeLinear,
# MatMulInteger), which ONNX Runtime fuses when it loads the graph.
QUANT_METHODS = ("blockwise", "dynamic")

# ops between the lm_head MatMul and the `logits` output that do not change what the MatMul computes
_PASS_THROUGH = {"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Add"}


def quantize_component(
    onnx_path: Path,
    bits: int,
    block_size: int = 32,
    symmetric: bool = True,
    exclude_lm_head: bool = False,
    quantize_embeddings: bool = False,
    accuracy_level: int | None = None,
    method: str = "blockwise",
) -> dict[str, Any]:
    """Quantize the MatMul weights of `onnx_path` in place (weights in `<name>.onnx.data`).

    Returns a summary: how many nodes were quantized, which were left alone and why, bytes before
    and after. Raises ValueError for unsupported settings and RuntimeError when the rewrite would
    change the graph's interface.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight quantization supports {', '.join(map(str, SUPPORTED_BITS))} bits, not {bits}")
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization method must be one of {', '.join(QUANT_METHODS)}, not {method!r}")
    if method == "dynamic" and bits != 8:
        raise ValueError(f"dynamic quantization is 8-bit only, not {bits}-bit")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 and at least 16, not {block_size}")

    data_name = onnx_path.name + ".data"
    bytes_before = _size(onnx_path, data_name)
    model = onnx.load(str(onnx_path), load_external_data=True)
    io_before = _io(model.graph)
    _name_nodes(model.graph)

    rewritten, gemms = _gemm_to_matmul(model.graph)
    folded = _fold_weight_transposes(model.graph)
    candidates = _weight_matmuls(model.graph)
    lm_head = lm_head_node(model.graph)
    excluded = [lm_head] if (exclude_lm_head and lm_head) else []
    targets = [n for n in candidates if n not in excluded]

    if targets and method == "dynamic":
        model = run_dynamic_quantizer(model, targets)
    elif targets:
        model = _run_ort_quantizer(model, bits, block_size, symmetric, accuracy_level, ("MatMul",), exclude=_all_names(model.graph, keep=targets))
        _dedupe_initializers(model.graph)
    fused = _fuse_bias(model.graph, gemms) if method == "blockwise" else 0

    embeddings: list[str] = []
    if quantize_embeddings:
        tables = _embedding_gathers(model.graph)
        if tables and bits == 4:
            opsets = {o.domain: o.version for o in model.opset_import}
            model = _run_ort_quantizer(model, 4, block_size, symmetric, None, ("Gather",), exclude=_all_names(model.graph, keep=tables))
            _dedupe_initializers(model.graph)
            # the quantizer raises the default-domain opset to 21 for int4 tensors; only the contrib op reads them
            # (IR version 10 is what the int4 type needs), so the graph keeps the opset it was exported with
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx") and o.domain in opsets:
                    o.version = opsets[o.domain]
        elif tables:
            _quantize_gathers_8bit(model, tables, block_size, symmetric)
        embeddings = tables

    quantized = [n.name for n in model.graph.node if n.op_type in ("MatMulNBits", "MatMulInteger")]
    gathered = [n.name for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    if _io(model.graph) != io_before:
        raise RuntimeError(f"{onnx_path.name}: quantization changed the graph's inputs/outputs")
    _drop_stale_value_info(model.graph)

    (onnx_path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    bytes_after = _size(onnx_path, data_name)
    return {
        "bits": bits,
        "method": method,
        "block_size": block_size if method == "blockwise" else None,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level,
        "weight_matmuls": len(candidates),
        "quantized_matmuls": len(quantized),
        "quantized_gathers": len(gathered),
        "lm_head": lm_head,
        "lm_head_quantized": bool(lm_head) and lm_head not in excluded,
        "excluded": excluded,
        "gemm_rewritten": rewritten,
        "bias_fused": fused,
        "transposes_folded": folded,
        "embeddings": embeddings,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
    }


# --- helpers ------------------------------------------------------------------------------------


def _size(onnx_path: Path, data_name: str) -> int:
    data = onnx_path.parent / data_name
    return onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _io(graph) -> list[tuple[str, str, int]]:
    return [(kind, v.name, v.type.tensor_type.elem_type) for kind, vs in (("in", graph.input), ("out", graph.output)) for v in vs]


def _name_nodes(graph) -> None:
    """The quantizer selects and excludes nodes by name: give unnamed nodes unique names."""
    used = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _all_names(graph, keep: list[str]) -> list[str]:
    k = set(keep)
    return [n.name for n in graph.node if n.name not in k]


def _float_types() -> set[int]:
    from onnx import TensorProto

    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _gemm_to_matmul(graph) -> tuple[int, dict[str, tuple[str, str]]]:
    """Rewrite `Gemm(A, W[, C])` with a constant 2-D W as MatMul(A, W as [K, N]) (+ Add C).

    Returns how many Gemms were rewritten and, for those with a 1-D bias,
    {matmul node name: (bias initializer name, final output name)}.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    floats = _float_types()
    with_bias: dict[str, tuple[str, str]] = {}
    rewritten = 0
    new_nodes = []
    for n in graph.node:
        w = inits.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
        c = inits.get(n.input[2]) if (w is not None and len(n.input) > 2 and n.input[2]) else None
        if (w is None or len(w.dims) != 2 or w.data_type not in floats or _attr(n, "transA", 0)
                or (len(n.input) > 2 and n.input[2] and c is None)):
            new_nodes.append(n)
            continue
        rewritten += 1
        alpha, beta = float(_attr(n, "alpha", 1.0)), float(_attr(n, "beta", 1.0))
        weight = numpy_helper.to_array(w)
        if _attr(n, "transB", 0):
            weight = weight.T
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        wname = _unique(inits, w.name + "_kn")
        inits[wname] = numpy_helper.from_array(np.ascontiguousarray(weight), wname)
        graph.initializer.append(inits[wname])
        out = n.output[0]
        if c is None:
            new_nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], [out], name=n.name))
            continue
        bias = numpy_helper.to_array(c)
        if beta != 1.0:
            bias = bias * np.asarray(beta, bias.dtype)
        bname = _unique(inits, c.name + "_bias")
        inits[bname] = numpy_helper.from_array(np.ascontiguousarray(bias), bname)
        graph.initializer.append(inits[bname])
        mm_out = _unique(inits, out + "_mm")
        new_nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name))
        new_nodes.append(onnx.helper.make_node("Add", [mm_out, bname], [out], name=n.name + "_bias"))
        if bias.ndim == 1 and bias.shape[0] == weight.shape[1]:
            with_bias[n.name] = (bname, out)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return rewritten, with_bias


def _fold_weight_transposes(graph) -> int:
    """MatMul(A, Transpose(W)) with W a constant 2-D initializer -> MatMul(A, W^T)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    folded = 0
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] in inits:
            continue
        t = producers.get(n.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = inits[t.input[0]]
        if len(w.dims) != 2 or w.data_type not in _float_types() or list(_attr(t, "perm", [1, 0])) != [1, 0]:
            continue
        name = _unique(inits, w.name + "_t")
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), name)
        graph.initializer.append(inits[name])
        n.input[1] = name
        folded += 1
    if folded:
        _drop_unconsumed(graph, "Transpose")
        _drop_unused_initializers(graph)
    return folded


def _weight_matmuls(graph) -> list[str]:
    """MatMuls the quantizer can take: B a constant float weight of shape [K, N] (or [1.., K, N])."""
    inits = {t.name: t for t in graph.initializer}
    floats = _float_types()
    out = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if len(w.dims) >= 2 and all(d == 1 for d in w.dims[:-2]) and w.data_type in floats:
            out.append(n.name)
    return out


def lm_head_node(graph) -> str | None:
    """The MatMul (a quantized graph's MatMulNBits) that produces the `logits` output (through
    casts/reshapes/bias), if any."""
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    outs = [o.name for o in graph.output if o.name == "logits"]
    if not outs:
        return None
    n = producers.get(outs[0])
    for _ in range(16):
        if n is None:
            return None
        if (n.op_type in ("MatMul", "Gemm") and n.input[1] in inits) or n.op_type == "MatMulNBits":
            return n.name
        if n.op_type not in _PASS_THROUGH:
            return None
        data = [i for i in n.input[:1 if n.op_type != "Add" else 2] if i and i not in inits]
        if len(data) != 1:
            return None
        n = producers.get(data[0])
    return None


def _embedding_gathers(graph) -> list[str]:
    inits = {t.name: t for t in graph.initializer}
    floats = _float_types()
    return [
        n.name for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
        and inits[n.input[0]].data_type in floats and _attr(n, "axis", 0) == 0
    ]


def _run_ort_quantizer(model, bits, block_size, symmetric, accuracy_level, op_types, exclude):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs one INFO line per node
    try:
        q = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=exclude,
            op_types_to_quantize=op_types,
        )
        q.process()
    finally:
        logger.setLevel(level)
    return q.model.model


def run_dynamic_quantizer(model, targets: list[str]):
    """`targets` (MatMul node names) through ONNX Runtime's quantize_dynamic: per-channel symmetric int8
    weights, uint8 activations quantized per tensor at run time."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.ERROR)
    # quantize_dynamic also advises "pre-processing" through the root logger, on every call
    advice = lambda record: not record.getMessage().startswith("Please consider to run pre-processing")  # noqa: E731
    logging.getLogger().addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(prefix="mmexport-dq-") as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                             nodes_to_quantize=list(targets), use_external_data_format=True)
            return onnx.load(str(out), load_external_data=True)
    finally:
        logger.setLevel(level)
        logging.getLogger().removeFilter(advice)


def _fuse_bias(graph, gemms: dict[str, tuple[str, str]]) -> int:
    """MatMulNBits(A, ...) -> Add(bias) from a rewritten Gemm: move the bias into MatMulNBits' input 5."""
    if not gemms:
        return 0
    by_name = {n.name: n for n in graph.node}
    drop = set()
    fused = 0
    for name, (bias, out) in gemms.items():
        for qname in (name + "_Q8", name + "_Q4", name + "_Q2"):
            q = by_name.get(qname)
            if q is not None and q.op_type == "MatMulNBits":
                break
        else:
            continue
        add = by_name.get(name + "_bias")
        if add is None or add.op_type != "Add" or list(add.input) != [q.output[0], bias] or add.output[0] != out:
            continue
        ins = list(q.input) + [""] * (5 - len(q.input))
        del q.input[:]
        q.input.extend(ins[:5] + [bias])
        q.output[0] = out
        drop.add(add.name)
        fused += 1
    if drop:
        keep = [n for n in graph.node if n.name not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return fused


def _quantize_gathers_8bit(model, names: list[str], block_size: int, symmetric: bool) -> None:
    """Gather(table, ids) -> com.microsoft::GatherBlockQuantized with uint8 data, blocks along the row."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = set(names)
    for i, n in enumerate(graph.node):
        if n.name not in wanted:
            continue
        table = numpy_helper.to_array(inits[n.input[0]])
        dtype = table.dtype
        rows, cols = table.shape
        blocks = -(-cols // block_size)
        pad = blocks * block_size - cols
        t = np.pad(table.astype(np.float32), ((0, 0), (0, pad))).reshape(rows, blocks, block_size)
        if symmetric:
            amax = np.abs(t).max(axis=2)
            scale = amax / 127.0
            inv = np.where(scale == 0, 0.0, 1.0 / np.where(scale == 0, 1.0, scale))
            q = np.clip(np.rint(t * inv[..., None]), -127, 127) + 128  # default zero point 128 for uint8
            zp = None
        else:
            lo = np.minimum(t.min(axis=2), 0.0)
            hi = np.maximum(t.max(axis=2), 0.0)
            scale = (hi - lo) / 255.0
            safe = np.where(scale == 0, 1.0, scale)
            zp = np.clip(np.rint(-lo / safe), 0, 255).astype(np.uint8)
            q = np.clip(np.rint(t / safe[..., None]) + zp[..., None], 0, 255)
        q = q.reshape(rows, blocks * block_size)[:, :cols].astype(np.uint8)
        base = n.input[0]
        qn, sn, zn = _unique(inits, base + "_Q8"), _unique(inits, base + "_scales"), _unique(inits, base + "_zero_points")
        new = [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale.astype(dtype), sn)]
        ins = [qn, n.input[1], sn]
        if zp is not None:
            new.append(numpy_helper.from_array(zp, zn))
            ins.append(zn)
        for t_ in new:
            inits[t_.name] = t_
        graph.initializer.extend(new)
        node = onnx.helper.make_node("GatherBlockQuantized", ins, [n.output[0]], name=n.name + "_Q8", domain="com.microsoft",
                                     bits=8, block_size=block_size, gather_axis=0, quantize_axis=1)
        graph.node[i].CopyFrom(node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(graph)


def _unique(taken, name: str) -> str:
    while name in taken:
        name += "_"
    return name


def _dedupe_initializers(graph) -> None:
    """A weight shared by several MatMuls is quantized once per use under the same name: keep one copy."""
    from collections import Counter

    dup = {name for name, c in Counter(t.name for t in graph.initializer).items() if c > 1}
    if not dup:
        return
    seen: dict[str, bytes] = {}
    keep = []
    for t in graph.initializer:
        if t.name in dup:
            if t.name in seen:
                if t.SerializeToString() != seen[t.name]:
                    raise RuntimeError(f"quantizer produced two different initializers named {t.name}")
                continue
            seen[t.name] = t.SerializeToString()
        keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _used_names(graph) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop/Scan bodies) included, plus the outputs."""
    import onnx

    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used |= _used_names(g)
    return used


def _drop_unconsumed(graph, op_type: str) -> None:
    used = _used_names(graph)
    keep = [n for n in graph.node if n.op_type != op_type or any(o in used for o in n.output)]
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _drop_unused_initializers(graph) -> None:
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _drop_stale_value_info(graph) -> None:
    """value_info for tensors that no longer exist (the rewritten Gemm/Transpose outputs) is noise."""
    live = {o for n in graph.node for o in n.output}
    keep = [v for v in graph.value_info if v.name in live]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
