"""export/graphopt.py: the rewrites are exact, standard ONNX, and ONNX Runtime fuses what they produce."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmexport.export.graphopt import fuse_sibling_matmuls, optimize_graph, rsqrt_as_div


def _block(h: int = 16, kv: int = 4, ff: int = 24):
    """RMSNorm (x * rsqrt(mean(x^2) + eps) * w) feeding q/k/v projections and a gate/up pair, as torch exports them."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
         for n, s in [("wq", (h, h)), ("wk", (h, kv)), ("wv", (h, kv)), ("wg", (h, ff)), ("wu", (h, ff)), ("norm_w", (h,))]}
    c = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
         numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["xn"]),
        helper.make_node("Mul", ["norm_w", "xn"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("MatMul", ["h", "wg"], ["g"]),
        helper.make_node("MatMul", ["h", "wu"], ["u"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["act"]),
        helper.make_node("Mul", ["act", "u"], ["mlp"]),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", None]) for n in ("q", "k", "v", "mlp")]
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type.lower()}_{i}"
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", h])], outs,
                          [*w.values(), *c])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _run(model, x, optimized=True):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _ort_ops(model) -> list[str]:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_rewrites_are_exact_and_fused_by_onnxruntime():
    before = _block()
    after = _block()
    assert optimize_graph(after) == {"rsqrt_as_div": 1, "fused_matmuls": 1}
    onnx.checker.check_model(after, full_check=True)
    ops = [n.op_type for n in after.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 1
    # five projections of the same activation: one MatMul over the concatenated weights, one Split
    assert ops.count("MatMul") == 1 and ops.count("Split") == 1
    fused = next(n for n in after.graph.node if n.op_type == "MatMul")
    w = next(t for t in after.graph.initializer if t.name == fused.input[1])
    assert list(w.dims) == [16, 16 + 4 + 4 + 24 + 24]
    assert not {"wq", "wk", "wv", "wg", "wu"} & {t.name for t in after.graph.initializer}  # no stale copies
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    for a, b in zip(_run(before, x, optimized=False), _run(after, x, optimized=False)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # what the rewrite is for: ONNX Runtime now fuses the norm into one kernel (it does not with Reciprocal)
    assert "SimplifiedLayerNormalization" in _ort_ops(after)
    assert "SimplifiedLayerNormalization" not in _ort_ops(before)


def test_leaves_what_it_must_not_touch():
    m = _with_extras()
    g = m.graph
    assert rsqrt_as_div(g) == 1
    assert [n.op_type for n in g.node].count("Reciprocal") == 1  # x's reciprocal stays
    assert fuse_sibling_matmuls(g) == 1
    assert sum(n.op_type == "MatMul" for n in g.node) == 2  # the fused one and x @ transpose(wq)
    assert "wq" in {t.name for t in g.initializer}  # still read by the Transpose
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(2).standard_normal((1, 3, 16)).astype(np.float32)
    ref = _run(_with_extras(), x, optimized=False)
    for a, b in zip(ref, _run(m, x, optimized=False)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _with_extras():
    """The block plus a Reciprocal that is not an rsqrt and a MatMul whose weight is computed in the graph."""
    m = _block()
    g = m.graph
    g.node.append(helper.make_node("Reciprocal", ["x"], ["rx"]))
    g.node.append(helper.make_node("Mul", ["rx", "x"], ["one"]))
    g.node.append(helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]))
    g.node.append(helper.make_node("MatMul", ["x", "wqt"], ["xq"]))
    g.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 16]) for n in ("one", "xq")])
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_weight_quantizes_like_the_separate_ones(bits):
    """Block-wise weight-only quantization runs along K: the fused projection gives the same outputs as the
    separately quantized projections."""
    from mmexport.export.quantize import _run_ort_quantizer

    sep, fused = _block(h=64, kv=32, ff=64), _block(h=64, kv=32, ff=64)
    fuse_sibling_matmuls(fused.graph)
    x = np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)
    outs = [_run(_run_ort_quantizer(m, bits, 32, True, 0, ("MatMul",), exclude=[]), x) for m in (sep, fused)]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
