"""MatMulNBits (ONNX Runtime's 4-bit kernel, accuracy level 4) against mmexport.MatMulNBitsVnni on the same
weights: first the outputs (they agree to float rounding), then the speed of a graph of COPIES nodes of
K x N, each with its own weights (so they stream from memory), alternated for ROUNDS rounds, beside
bench's read probe.

    python synthetic.py LIB.so K N BLOCK COPIES [ROUNDS] [THREADS]
    python synthetic.py ./libmmx_vnni.so 896 4864 32 100 8
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mmexport.bench.limits import measure_read_bandwidth


def pack(w, bs):
    """float [N, K] -> MatMulNBits' B [N, K/bs, bs/2] uint8 and scales [N, K/bs], symmetric round to nearest."""
    n, k = w.shape
    wb = w.reshape(n, k // bs, bs)
    s = np.abs(wb).max(-1) / 7.0 + 1e-12
    q = np.clip(np.rint(wb / s[..., None]), -8, 7).astype(np.int32) + 8
    return np.ascontiguousarray((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)), s.astype(np.float32)


def session(lib, B, S, K, N, bs, copies, threads, ours):
    nodes, inits = [], []
    for c in range(copies):
        inits += [numpy_helper.from_array(B ^ np.uint8(c % 7), f"B{c}"), numpy_helper.from_array(S.reshape(-1) * (1 + c / 100), f"S{c}")]
        attrs = dict(K=K, N=N, bits=4, block_size=bs)
        if ours:
            nodes.append(helper.make_node("MatMulNBitsVnni", ["x", f"B{c}", f"S{c}"], [f"y{c}"], domain="mmexport", **attrs))
        else:
            nodes.append(helper.make_node("MatMulNBits", ["x", f"B{c}", f"S{c}"], [f"y{c}"], domain="com.microsoft", accuracy_level=4, **attrs))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, ["m", N]) for c in range(copies)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("mmexport", 1)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if ours:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main():
    lib, K, N, bs, copies = sys.argv[1], *map(int, sys.argv[2:6])
    rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    threads = int(sys.argv[7]) if len(sys.argv) > 7 else 2
    rng = np.random.default_rng(0)
    B, S = pack(rng.standard_normal((N, K)).astype(np.float32), bs)
    mlas, ours = (session(lib, B, S, K, N, bs, copies, threads, o) for o in (False, True))
    for m in (1, 5, 288):
        x = {"x": rng.standard_normal((m, K)).astype(np.float32)}
        a, b = mlas.run(None, x), ours.run(None, x)
        print(f"M={m}: largest difference / largest output {max(float(np.abs(p - q).max() / np.abs(p).max()) for p, q in zip(a, b)):.1e}")
    x = {"x": rng.standard_normal((1, K)).astype(np.float32)}
    nbytes = copies * (B.nbytes + S.nbytes)
    for _ in range(rounds):
        line = []
        for name, s in (("MatMulNBits", mlas), ("MatMulNBitsVnni", ours)):
            for _ in range(2):
                s.run(None, x)
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                s.run(None, x)
                ts.append(time.perf_counter() - t)
            line.append(f"{name} {nbytes / np.median(ts) / 1e9:.1f} GB/s")
        print(f"{nbytes / 1e6:.0f} MB at M=1: " + ", ".join(line) + f"; read probe {measure_read_bandwidth(int(nbytes), threads):.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
