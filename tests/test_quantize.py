"""Weight-only int8/int4 quantization (ONNX Runtime's MatMulNBits / GatherBlockQuantized), real ORT sessions.

The tiny recipe has random weights, so its int4 logits are far noisier than a trained model's: the
bounds below are what round-to-nearest int4 gives on it (measured: decoder logits cosine ~0.95,
int8 ~0.9998), with margin. Exactness is proven separately: every quantized node computes
`A @ dequantize(stored weight)` to float rounding.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmexport.export.quantize import QUANT_NAMES, quantize_component

ort = pytest.importorskip("onnxruntime")

COMPONENTS = ("decoder", "vision_encoder", "embed_tokens")


def _session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cmp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.abs(a - b).max()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _io(model) -> list[bytes]:
    return [v.SerializeToString() for v in [*model.graph.input, *model.graph.output]]


def _weight_matmuls(model) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def _dequant(model, node) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node multiplies by (symmetric: default zero point)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    packed, scales = inits[node.input[1]], inits[node.input[2]].reshape(n, -1).astype(np.float32)
    assert len(node.input) < 4 or not node.input[3], "symmetric weights carry no zero points"
    if bits == 8:
        q = packed.reshape(n, -1, bs).astype(np.int32)
    else:
        b = packed.reshape(n, -1, bs // 2)
        q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1, bs).astype(np.int32)
    w = (q - (1 << (bits - 1))) * scales[:, :, None]
    return w.reshape(n, -1)[:, :k].T


@pytest.fixture(scope="session")
def quantized(tiny_artifacts, tmp_path_factory):
    """{variant: (dir, {component: summary})}: fp32 originals and int8/int4 copies of the tiny graphs."""
    root = tmp_path_factory.mktemp("quantized")
    out = {"fp32": (tiny_artifacts / "onnx", {})}
    variants = {"int8": (8, False), "int4": (4, False), "int8-keep-head": (8, True)}
    for variant, (bits, keep_head) in variants.items():
        d = root / variant
        shutil.copytree(tiny_artifacts / "onnx", d)
        out[variant] = (d, {c: quantize_component(d / f"{c}.onnx", bits, exclude_lm_head=keep_head,
                                                  quantize_embeddings=True) for c in COMPONENTS})
    return out


@pytest.fixture(scope="session")
def decoder_feed(quantized):
    """A prefill of 24 real token embeddings into an empty KV cache, built from the graph's declared inputs (so it
    follows the decoder's interface: past/present or a static cache with its mask)."""
    ids = np.random.default_rng(0).integers(0, 896, (1, 24)).astype(np.int64)
    emb = _session(quantized["fp32"][0] / "embed_tokens.onnx").run(None, {"input_ids": ids})[0]
    s = ids.shape[1]
    feed = {}
    for i in _session(quantized["fp32"][0] / "decoder.onnx").get_inputs():
        if i.name == "inputs_embeds":
            feed[i.name] = emb
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(s), (3, 1, s)).astype(np.int64).copy()
        elif i.type == "tensor(int64)":  # attention mask over past + new (all new: ones) or the empty cache's slot mask
            shape = [1 if d == "batch" else 0 if d == "cache_len" else (s if isinstance(d, str) or d is None else d) for d in i.shape]
            feed[i.name] = (np.zeros if "cache" in i.name else np.ones)(shape, np.int64)
        else:  # the KV cache: empty past (length 0), as the runtime feeds an empty static cache
            shape = [1 if d == "batch" else (0 if isinstance(d, str) or d is None else d) for d in i.shape]
            feed[i.name] = np.zeros(shape, np.float32)
    return ids, feed


def test_quant_names():
    assert QUANT_NAMES == {"int8": 8, "int4": 4}


@pytest.mark.parametrize("variant,bits", [("int8", 8), ("int4", 4)])
def test_every_projection_weight_becomes_matmulnbits(quantized, variant, bits):
    ref_dir = quantized["fp32"][0]
    d, summaries = quantized[variant]
    # decoder: 2 layers x (q/k/v fused, o, gate/up fused, down) + lm_head (export/graphopt.py fuses sibling
    # projections); vision: patch embed + 2 x (qkv, proj, fc1, fc2)
    expect = {"decoder": 9, "vision_encoder": 9}
    for comp in COMPONENTS:
        ref = onnx.load(str(ref_dir / f"{comp}.onnx"))
        model = onnx.load(str(d / f"{comp}.onnx"))
        s = summaries[comp]
        assert _io(model) == _io(ref), comp  # names, dtypes, shapes: the same interface
        onnx.checker.check_model(str(d / f"{comp}.onnx"), full_check=True)
        assert s["bytes_after"] < s["bytes_before"] * (0.45 if bits == 8 else 0.3), (comp, s)
        assert (d / f"{comp}.onnx.data").stat().st_size < (ref_dir / f"{comp}.onnx.data").stat().st_size
        assert not [p.name for p in d.glob(f"{comp}.onnx*") if p.name not in (f"{comp}.onnx", f"{comp}.onnx.data")]
        assert not _weight_matmuls(model), f"{comp}: a weight MatMul/Gemm was left in float"
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert all(n.domain == "com.microsoft" for n in nbits)
        assert {helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} <= {bits}
        if comp == "embed_tokens":
            assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
            assert s["quantized_gathers"] == 1 and s["embeddings"] == ["node_embedding"]
        else:
            assert len(nbits) == len(_weight_matmuls(ref)) == expect[comp] == s["quantized_matmuls"] == s["weight_matmuls"]
    assert summaries["decoder"]["lm_head"] and summaries["decoder"]["lm_head_quantized"]
    assert summaries["vision_encoder"]["lm_head"] is None


def test_quantized_nodes_compute_with_their_stored_weights(quantized):
    """ORT's MatMulNBits result == A @ dequantize(stored blocks): the format is what we think it is."""
    for variant in ("int8", "int4"):
        d, _ = quantized[variant]
        model = onnx.load(str(d / "vision_encoder.onnx"))
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "pixel_values")
        w = _dequant(model, node)  # the patch embedding: K = 1176, not a multiple of the block size
        assert w.shape == (1176, 64)
        single = helper.make_model(
            helper.make_graph([node], "one", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 1176])],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, ["n", 64])],
                              [t for t in model.graph.initializer if t.name in node.input]),
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        x = np.random.default_rng(1).standard_normal((16, 1176)).astype(np.float32)
        got = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
        np.testing.assert_allclose(got, x @ w, rtol=1e-4, atol=1e-4)


def test_decoder_logits_stay_close(quantized, decoder_feed):
    _, feed = decoder_feed
    ref = _session(quantized["fp32"][0] / "decoder.onnx").run(None, feed)
    measured = {}
    for variant in ("int8", "int4", "int8-keep-head"):
        sess = _session(quantized[variant][0] / "decoder.onnx")
        assert [(i.name, i.type) for i in sess.get_inputs()] == [(k, "tensor(float)" if v.dtype == np.float32 else "tensor(int64)") for k, v in feed.items()]
        out = sess.run(None, feed)
        assert all(o.shape == r.shape and o.dtype == r.dtype and np.isfinite(o).all() for o, r in zip(out, ref))
        names = [o.name for o in sess.get_outputs()]
        assert names[0] == "logits"
        key = next(i for i, n in enumerate(names) if n.endswith("key_1"))  # layer 1's keys: the error one layer in
        measured[variant] = {"logits": _cmp(ref[0], out[0]), "key_1": _cmp(ref[key], out[key])}
    print("\nquantized decoder vs fp32 (max abs, cosine):", measured)
    assert measured["int8"]["logits"][1] > 0.999 and measured["int8"]["logits"][0] < 0.2
    assert measured["int8"]["key_1"][1] > 0.9995
    assert measured["int8"]["logits"][0] > 1e-4  # really quantized
    # int4 on random weights: measured cosine ~0.95 (logits), ~0.97 (layer-1 keys)
    assert 0.9 < measured["int4"]["logits"][1] < measured["int8"]["logits"][1]
    assert measured["int4"]["key_1"][1] > 0.95
    assert measured["int8-keep-head"]["logits"][1] > 0.999


def test_vision_encoder_stays_close(quantized):
    rng = np.random.default_rng(2)
    ang = rng.uniform(0, 6, (64, 16)).astype(np.float32)
    feed = {"pixel_values": rng.standard_normal((64, 1176)).astype(np.float32), "rotary_cos": np.cos(ang), "rotary_sin": np.sin(ang)}
    ref = _session(quantized["fp32"][0] / "vision_encoder.onnx").run(None, feed)[0]
    m8 = _cmp(ref, _session(quantized["int8"][0] / "vision_encoder.onnx").run(None, feed)[0])
    m4 = _cmp(ref, _session(quantized["int4"][0] / "vision_encoder.onnx").run(None, feed)[0])
    print("\nquantized vision encoder vs fp32 (max abs, cosine): int8", m8, "int4", m4)
    assert m8[1] > 0.9999 and m4[1] > 0.99 and m4[0] > m8[0]


def test_embeddings_gather_block_quantized(quantized, decoder_feed):
    ids, feed = decoder_feed
    ref = feed["inputs_embeds"]
    for variant, min_cos in (("int8", 0.9999), ("int4", 0.99)):
        d, s = quantized[variant]
        got = _session(d / "embed_tokens.onnx").run(None, {"input_ids": ids})[0]
        assert got.shape == ref.shape and got.dtype == ref.dtype
        err, cos = _cmp(ref, got)
        assert cos > min_cos and 0 < err < 0.05, (variant, err, cos)
    exported = {c: onnx.load(str(quantized["fp32"][0] / f"{c}.onnx"), load_external_data=False).opset_import for c in COMPONENTS}
    exported = {c: next(o.version for o in ops if o.domain == "") for c, ops in exported.items()}
    for variant in ("int8", "int4"):  # the exported opset stays (the int4 table is read by the contrib op only)
        assert {c: s["opset"] for c, s in quantized[variant][1].items()} == exported


def test_exclude_lm_head_keeps_the_last_matmul(quantized):
    ref = onnx.load(str(quantized["fp32"][0] / "decoder.onnx"))
    d, s = quantized["int8-keep-head"]
    model = onnx.load(str(d / "decoder.onnx"))
    head = s["decoder"]["lm_head"]
    assert s["decoder"]["excluded"] == [head] and not s["decoder"]["lm_head_quantized"]
    left = [n for n in model.graph.node if n.name in _weight_matmuls(model)]
    assert [n.name for n in left] == [head]
    # the last weight MatMul of the original graph, the one that feeds `logits`, untouched (same float weight)
    assert _weight_matmuls(ref)[-1] == head
    inits = {t.name: t for t in model.graph.initializer}
    ref_inits = {t.name: t for t in ref.graph.initializer}
    w = inits[left[0].input[1]]
    assert w.data_type == TensorProto.FLOAT and np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(ref_inits[w.name]))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 8  # the 9 weight MatMuls but the head
    assert s["vision_encoder"]["quantized_matmuls"] == 9  # no lm_head there: everything quantized


def _save(model, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def test_gemm_with_bias_and_transposed_and_shared_weights(tmp_path):
    """The shapes real checkpoints export: Linear with bias as Gemm(transB=1), a weight behind a Transpose, a weight
    used twice, and a lm_head feeding `logits` through a Cast."""
    rng = np.random.default_rng(3)
    k, n, v = 80, 64, 100  # K = 80: not a multiple of the block size
    w_gemm = rng.standard_normal((n, k)).astype(np.float32) * 0.1  # [N, K], transB=1
    bias = rng.standard_normal(n).astype(np.float32)
    w_t = rng.standard_normal((n, n)).astype(np.float32) * 0.1  # used as Transpose(w_t)
    w_s = rng.standard_normal((n, n)).astype(np.float32) * 0.1  # shared by two MatMuls
    w_head = rng.standard_normal((n, v)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(a, name) for a, name in ((w_gemm, "w_gemm"), (bias, "bias"), (w_t, "w_t"), (w_s, "w_s"), (w_head, "w_head"))]
    nodes = [
        helper.make_node("Gemm", ["x", "w_gemm", "bias"], ["h0"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Transpose", ["w_t"], ["w_t_T"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["h0", "w_t_T"], ["h1"], name="mm_t"),
        helper.make_node("MatMul", ["h1", "w_s"], ["h2"], name="mm_s1"),
        helper.make_node("MatMul", ["h2", "w_s"], ["h3"], name="mm_s2"),
        helper.make_node("MatMul", ["h3", "w_head"], ["head"], name="lm_head"),
        helper.make_node("Cast", ["head"], ["logits"], to=TensorProto.FLOAT),  # unnamed on purpose
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", v])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = rng.standard_normal((5, k)).astype(np.float32)
    fp32 = 0.5 * x @ w_gemm.T + 2.0 * bias
    fp32 = (((fp32 @ w_t.T) @ w_s) @ w_s) @ w_head
    path = _save(model, tmp_path / "g.onnx")
    np.testing.assert_allclose(_session(path).run(None, {"x": x})[0], fp32, rtol=1e-4, atol=1e-4)

    s = quantize_component(path, 8, block_size=16, exclude_lm_head=True)
    q = onnx.load(str(path))
    assert (s["gemm_rewritten"], s["bias_fused"], s["transposes_folded"], s["lm_head"]) == (1, 1, 1, "lm_head")
    assert s["quantized_matmuls"] == 4 and s["weight_matmuls"] == 5
    assert [nd.op_type for nd in q.graph.node] == ["MatMulNBits"] * 4 + ["MatMul", "Cast"]
    assert len({t.name for t in q.graph.initializer}) == len(q.graph.initializer)  # the shared weight is stored once
    fc = q.graph.node[0]
    assert len(fc.input) == 6 and fc.input[5] and fc.output[0] == "h0"  # the Gemm's bias rides in MatMulNBits' bias input
    got = _session(path).run(None, {"x": x})[0]
    deq = [_dequant(q, nd) for nd in q.graph.node[:4]]
    bias_q = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == fc.input[5]))
    exact = (((x @ deq[0] + bias_q) @ deq[1]) @ deq[2]) @ deq[3] @ w_head
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deq[0], 0.5 * w_gemm.T, atol=np.abs(w_gemm).max() * 0.5 / 127 * 0.51 + 1e-7)
    err, cos = _cmp(fp32, got)
    assert cos > 0.9999 and err < 0.05


def test_refuses_unsupported_settings(tmp_path):
    with pytest.raises(ValueError, match="bits"):
        quantize_component(tmp_path / "none.onnx", 3)
    with pytest.raises(ValueError, match="block_size"):
        quantize_component(tmp_path / "none.onnx", 4, block_size=24)


@pytest.mark.parametrize("bits,min_cos", [(8, 0.9999), (4, 0.99)])
def test_asymmetric_weights_with_zero_points(quantized, tmp_path, bits, min_cos):
    src = quantized["fp32"][0]
    for f in ("vision_encoder.onnx", "vision_encoder.onnx.data", "embed_tokens.onnx", "embed_tokens.onnx.data"):
        shutil.copy(src / f, tmp_path / f)
    s = quantize_component(tmp_path / "vision_encoder.onnx", bits, symmetric=False)
    e = quantize_component(tmp_path / "embed_tokens.onnx", bits, symmetric=False, quantize_embeddings=True)
    assert s["quantized_matmuls"] == 9 and e["quantized_gathers"] == 1
    for comp in ("vision_encoder", "embed_tokens"):
        model = onnx.load(str(tmp_path / f"{comp}.onnx"))
        assert all(len(n.input) >= 4 and n.input[3] for n in model.graph.node if n.domain == "com.microsoft"), comp
    ids = np.arange(896, dtype=np.int64).reshape(1, -1)
    ref = _session(src / "embed_tokens.onnx").run(None, {"input_ids": ids})[0]
    assert _cmp(ref, _session(tmp_path / "embed_tokens.onnx").run(None, {"input_ids": ids})[0])[1] > min_cos
    rng = np.random.default_rng(4)
    ang = rng.uniform(0, 6, (16, 16)).astype(np.float32)
    feed = {"pixel_values": rng.standard_normal((16, 1176)).astype(np.float32), "rotary_cos": np.cos(ang), "rotary_sin": np.sin(ang)}
    ref = _session(src / "vision_encoder.onnx").run(None, feed)[0]
    assert _cmp(ref, _session(tmp_path / "vision_encoder.onnx").run(None, feed)[0])[1] > min_cos


def quantized_int4_decoder(tiny_artifacts, tmp_path) -> Path:
    d = tmp_path / "int4"
    shutil.copytree(tiny_artifacts / "onnx", d)
    quantize_component(d / "decoder.onnx", 4)
    return d / "decoder.onnx"


def test_dynamic_int8_integer_gemms(tiny_artifacts, decoder_feed, tmp_path):
    """method="dynamic": every weight MatMul becomes an integer GEMM (MatMulInteger on per-channel int8 weights,
    activations quantized per tensor at run time), the interface is unchanged, the outputs stay close; 8-bit only."""
    d = tmp_path / "dq"
    shutil.copytree(tiny_artifacts / "onnx", d)
    ref = onnx.load(str(tiny_artifacts / "onnx" / "decoder.onnx"))
    s = quantize_component(d / "decoder.onnx", 8, method="dynamic")
    model = onnx.load(str(d / "decoder.onnx"))
    assert _io(model) == _io(ref)
    ints = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(ints) == len(_weight_matmuls(ref)) == s["quantized_matmuls"] == s["weight_matmuls"] == 9
    assert not _weight_matmuls(model) and not [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ONNX ops only
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[n.input[1]].data_type == TensorProto.INT8 for n in ints)
    assert s["method"] == "dynamic" and s["block_size"] is None and s["lm_head_quantized"]
    _, feed = decoder_feed
    want = _session(tiny_artifacts / "onnx" / "decoder.onnx").run(None, feed)[0]
    got = _session(d / "decoder.onnx").run(None, feed)[0]
    max_abs, cos = _cmp(want, got)
    # activations quantized per tensor: coarser than the block-wise int8 above (measured cosine 0.998 on random weights,
    # with VNNI; a CPU without it runs u8s8 through 16-bit pair sums that can saturate, hence the margin)
    assert cos > 0.99 and 1e-4 < max_abs < 0.5, (max_abs, cos)
    # bench --profile's weight kernels alone: each integer GEMM goes with its run-time quantizer and scale, as ONNX
    # Runtime fuses them, and reads the stored weights where they are
    from mmexport.bench.profile import _weight_nodes, weight_kernels_alone

    for path in (d / "decoder.onnx", quantized_int4_decoder(tiny_artifacts, tmp_path)):
        a = weight_kernels_alone(path, runs=3, warmup=1)
        w = _weight_nodes(path)
        assert a["nodes"] == len(w) == 9 and a["weight_bytes"] == sum(x[3] for x in w.values()) and a["ms"] > 0
    v = quantize_component(d / "vision_encoder.onnx", 8, method="dynamic")
    assert v["quantized_matmuls"] == v["weight_matmuls"] == 9 and v["gemm_rewritten"] > 0
    with pytest.raises(ValueError, match="8-bit only"):
        quantize_component(d / "embed_tokens.onnx", 4, method="dynamic")
    with pytest.raises(ValueError, match="method"):
        quantize_component(d / "embed_tokens.onnx", 8, method="gptq")
