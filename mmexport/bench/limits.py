"""How close a build runs to this machine's own limits (`mmexport bench`, reported next to the timings).

Decode at batch 1 reads every weight once per token, so its limit is memory bandwidth; prefill and the
vision tower multiply many rows by each weight, so theirs is GEMM throughput. Both limits are measured in the
same run, with the runtime's thread count:

- read bandwidth: threads OR-reducing disjoint slices of one buffer of integers as large as what a decode step
  reads (so the same caches help or not as they help the decoder), best of a few passes;
- GEMM peak: ONNX Runtime's own MatMul (the kernels the exported graphs run) on a [512, 2048] x [2048, 2048]
  product with float32 weights, and with 8-bit / 4-bit block-quantized weights (MatMulNBits) for quantized
  builds, at the build's accuracy level: the decoder's format for prefill, the vision encoder's for vision.

On a shared machine both drift from minute to minute by more than the kernels they judge, so bench samples
them after each of its timed runs and reports the medians, with the samples (`LimitProbes`). The probes run
in a child process: their buffers, sessions and imports (onnx, ONNX Runtime's quantizer) never touch the
benchmarked process's memory figures, and the child sleeps while a run is timed.

What a request costs is read off the artifact: the bytes of each graph's weights (its .onnx and .onnx.data
files), the cache a decode step reads (the filled slots, on average over the request's decode steps, where the
backend feeds only those; else the whole preallocated buffer: attention then runs over every slot, masked or
not), one embedding row; and the FLOPs of the weight MatMuls (2 x K x N per row of input, from the
graphs, the LM head once per prefill as the decoder computes only the last position's logits; attention's
score/value products are not counted, so FLOP/s figures are lower bounds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


def runtime_threads() -> int:
    """The intra-op threads the runtime's ONNX Runtime sessions use (MMEXPORT_THREADS, else one per physical core)."""
    n = int(os.environ.get("MMEXPORT_THREADS", "0") or 0)
    if n:
        return n
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------
# what the build reads and computes
# --------------------------------------------------------------------------------------------------
def graph_bytes(manifest, component: str) -> int:
    """Bytes of a component's weights as stored (the .onnx file and its external data)."""
    c = manifest.data["components"][component]
    return sum((manifest.root / rel).stat().st_size for rel in [c["file"], *c.get("data_files", [])])


def matmul_flops(onnx_path: Path) -> tuple[int, int] | None:
    """(per input row, of which the LM head): 2 x K x N summed over the graph's MatMul / Gemm / MatMulNBits /
    MatMulInteger nodes whose weight is a stored tensor. The decoder's LM head runs on the last position only,
    once per call. None when the onnx package is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    from ..export.quantize import lm_head_node

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    head = lm_head_node(model.graph)
    total = head_flops = 0
    for n in model.graph.node:
        f = 0
        if n.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]]) == 2:
            k, m = inits[n.input[1]]
            f = 2 * k * m
        elif n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            f = 2 * int(attrs["K"]) * int(attrs["N"])
        total += f
        if n.name == head:
            head_flops = f
    return total, head_flops


def decode_step_bytes(manifest, slots: int | None = None) -> dict[str, int]:
    """What one decode step (batch 1) reads: the decoder's weights, the KV cache (`slots` filled slots, as the ONNX
    Runtime backend feeds them; None: the whole buffer, as a backend fed the fixed capacity reads it), one
    embedding row."""
    spec = manifest.components["decoder"]
    kv = 0
    cap = slots if slots is not None else spec.dims["cache_len"].max if "cache_len" in spec.dims else 0
    for t in spec.inputs:
        if t.name.startswith("cache_") and t.name != "cache_mask":
            n = 1
            for d in t.shape:
                n *= (1 if d == "batch" else cap if d == "cache_len" else d) if isinstance(d, str) else d
            kv += n * _DTYPE_BYTES[t.dtype]
    emb = manifest.components["embed_tokens"].outputs[0]
    row = int(emb.shape[-1]) * _DTYPE_BYTES[emb.dtype] if isinstance(emb.shape[-1], int) else 0
    weights = graph_bytes(manifest, "decoder")
    return {"weights": weights, "kv_cache": kv, "embedding_row": row, "total": weights + kv + row}


# --------------------------------------------------------------------------------------------------
# the machine's limits
# --------------------------------------------------------------------------------------------------
def measure_read_bandwidth(nbytes: int, threads: int, passes: int = 5, min_bytes: int = 256 << 20) -> float:
    """GB/s of `threads` threads each OR-reducing its slice of one `nbytes` buffer of 64-bit integers (numpy's
    reductions release the GIL): the best of `passes`, each reading the buffer as many times as it takes to read
    `min_bytes` (so thread start-up does not count for small buffers). An integer OR has no floating-point
    dependency chain, so a thread reads as fast as memory feeds it: a float sum is bound by its adds on this repo's
    machine (one thread 22 GB/s, two 32-34, where the OR reads 32 and 36 and llama.cpp's fp32 decode moves 36)."""
    n = max(nbytes // 8, threads * 1024)
    buf = np.ones(n, dtype=np.uint64)
    slices = np.array_split(buf, threads)
    reps = max(1, -(-min_bytes // buf.nbytes))
    best = 0.0
    for _ in range(passes):
        barrier = threading.Barrier(threads + 1)

        def work(a):
            barrier.wait()
            for _ in range(reps):
                np.bitwise_or.reduce(a)

        workers = [threading.Thread(target=work, args=(s,)) for s in slices]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        dt = time.perf_counter() - t0
        best = max(best, reps * buf.nbytes / dt / GB)
    return best


def run_times(sess, feeds: dict[str, Any], runs: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `runs` timed `sess.run(None, feeds)` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


def gemm_kind(bits: int | None, method: str = "blockwise", block_size: int = 32, accuracy_level: int | None = None) -> str:
    """How a stage's weight MatMuls compute, in words (the GEMM its limit is measured with)."""
    if bits and method == "dynamic":
        return "int8 dynamic quantization (MatMulInteger)"
    return f"{bits}-bit MatMulNBits (blocks of {block_size}, accuracy level {accuracy_level})" if bits else "float32 MatMul"


def weight_formats(manifest) -> dict[str, dict[str, Any]]:
    """The weight format of each compute-bound stage, from the manifest: "decoder" (prefill) and "vision"."""
    quant = manifest.data.get("quantization") or {}
    quantized = quant.get("components") or {}
    common = {"accuracy_level": quant.get("accuracy_level"), "block_size": int(quant.get("block_size") or 32)}
    method = quant.get("method", "blockwise")
    # a prompt runs through the decoder's prefill graph where the build made one (int8 dynamic)
    prefill = ({"bits": 8, "method": quant["prefill_method"]} if quant.get("prefill_method") else
               {"bits": quant.get("bits") if "decoder" in quantized else None, "method": method})
    return {
        "decoder": {**prefill, **common},
        "vision": {"bits": (quant.get("vision_bits") or quant.get("bits")) if "vision_encoder" in quantized else None,
                   "method": quant.get("vision_method") or method, **common},
    }


class GemmProbe:
    """GFLOP/s of ONNX Runtime's MatMul on [m, k] x [k, n] (float32 weights, or MatMulNBits with `bits`-bit blocks
    of `block_size` weights at `accuracy_level`, or with `method="dynamic"` the int8 integer GEMM of dynamic
    quantization), with the runtime's session settings. The session is made once; `sample()` is the best of
    `repeat` runs, None without the onnx package."""

    def __init__(self, threads: int, bits: int | None = None, accuracy_level: int | None = None, method: str = "blockwise",
                 block_size: int = 32, m: int = 512, k: int = 2048, n: int = 2048):
        self.flops = 2 * m * k * n
        self.sess = None
        try:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper
        except ImportError:
            return
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(w, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = min(model.ir_version, 10)
        if bits and method == "dynamic":
            from ..export.quantize import run_dynamic_quantizer

            model = run_dynamic_quantizer(model, ["mm"])
        elif bits:
            import logging

            from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
            q = MatMulNBitsQuantizer(model, algo_config=cfg)
            quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
            level, quiet.level = quiet.level, logging.WARNING
            try:
                q.process()
            finally:
                quiet.setLevel(level)
            model = q.model.model
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.feeds = {"x": rng.standard_normal((m, k)).astype(np.float32)}

    def sample(self, repeat: int = 5, min_seconds: float = 0.25) -> float | None:
        """The best of at least `repeat` runs, and of as many as fill `min_seconds` (a fast GEMM's few runs would
        otherwise all fall in one disturbed moment)."""
        if self.sess is None:
            return None
        times = run_times(self.sess, self.feeds, repeat)
        while sum(times) < min_seconds:
            times += run_times(self.sess, self.feeds, repeat, warmup=0)
        return self.flops / min(times) / 1e9


def _probe_worker() -> None:
    """The child of LimitProbes: makes the GEMM sessions named in argv[1], says "ready", then answers each
    request (a line of JSON: the bytes to read) with a line of JSON: the read bandwidth and each GEMM's
    GFLOP/s. Ends at end of input."""
    cfg = json.loads(sys.argv[1])
    threads = int(cfg["threads"])
    probes = {kind: GemmProbe(threads, **fmt) for kind, fmt in cfg["gemms"].items()}
    out = sys.stdout
    out.write(json.dumps("ready") + "\n")
    out.flush()
    for line in sys.stdin:
        nbytes = int(json.loads(line))
        time.sleep(0.1)  # the benchmarked process's thread pools spin a moment after its run before they sleep
        read = measure_read_bandwidth(nbytes, threads, passes=3)
        out.write(json.dumps({"read_gbps": read, "gemm_gflops": {k: p.sample() for k, p in probes.items()}}) + "\n")
        out.flush()


class LimitProbes:
    """This machine's limits for one build, sampled in a child process whenever `sample(nbytes)` is called (bench:
    after each timed run): the read bandwidth over `nbytes`, and the GEMM peak of each stage's weight format."""

    def __init__(self, manifest, threads: int | None = None):
        self.threads = threads or runtime_threads()
        self.formats = weight_formats(manifest)
        self.kinds = {stage: gemm_kind(**fmt) for stage, fmt in self.formats.items()}
        gemms = {gemm_kind(**fmt): fmt for fmt in self.formats.values()}
        self.read: list[float] = []
        self.gemm: dict[str, list[float]] = {k: [] for k in gemms}
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the mmexport package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "mmexport.bench.limits", json.dumps({"threads": self.threads, "gemms": gemms})],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._answer()

    def _answer(self):
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the limit probe process ended (exit {code}); its error is above")
        return json.loads(line)

    def sample(self, nbytes: int) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{int(nbytes)}\n")
        self._proc.stdin.flush()
        got = self._answer()
        self.read.append(float(got["read_gbps"]))
        for k, v in got["gemm_gflops"].items():
            if v is not None:
                self.gemm[k].append(float(v))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
@dataclass
class Limits:
    threads: int
    decode_bytes: dict[str, int]  # per step: weights, kv_cache, embedding_row, total
    read_gbps: float  # measured, same working-set size and threads: the median of read_gbps_samples
    gemm_peak_gflops: float | None  # measured, the build's weight format
    gemm_kind: str
    flops_per_row: dict[str, int | None] = field(default_factory=dict)  # component -> weight-MatMul FLOPs per input row
    decode_gbps: float = 0.0  # effective: bytes per step x decode tokens/s
    prefill_gflops: float | None = None
    vision_gflops: float | None = None
    prefill_flops: int | None = None
    vision_flops: int | None = None
    vision_gemm_peak_gflops: float | None = None  # the vision encoder's weight format (float32 unless it was quantized)
    vision_gemm_kind: str = ""
    read_gbps_samples: list[float] = field(default_factory=list)  # one after each timed run; read_gbps is their median
    gemm_peak_samples: dict[str, list[float]] = field(default_factory=dict)  # per GEMM kind, one after each timed run

    @property
    def percent(self) -> dict[str, float | None]:
        peak, vpeak = self.gemm_peak_gflops, self.vision_gemm_peak_gflops
        return {
            "decode": 100 * self.decode_gbps / self.read_gbps if self.read_gbps else None,
            "prefill": 100 * self.prefill_gflops / peak if peak and self.prefill_gflops is not None else None,
            "vision": 100 * self.vision_gflops / vpeak if vpeak and self.vision_gflops is not None else None,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percent_of_limit"] = {k: (round(v, 1) if v is not None else None) for k, v in self.percent.items()}
        d["read_gbps_samples"] = [round(v, 2) for v in self.read_gbps_samples]
        d["gemm_peak_samples"] = {k: [round(v, 2) for v in vs] for k, vs in self.gemm_peak_samples.items()}
        for key in ("read_gbps", "gemm_peak_gflops", "decode_gbps", "prefill_gflops", "vision_gflops", "vision_gemm_peak_gflops"):
            if d[key] is not None:
                d[key] = round(d[key], 2)
        return d


def measure_limits(manifest, rows: dict[str, int], timings_ms: dict[str, float], decode_tok_s: float,
                   probes: LimitProbes, log=print) -> Limits:
    """How close the median request came to this machine's limits for this build (`rows`: input rows per request
    of each component: prompt tokens for the decoder, patches for the vision encoder; `probes`: the limits
    sampled beside the timed runs, over what a decode step reads)."""
    step = decode_step_bytes(manifest, rows.get("kv_slots"))
    if not probes.read:
        probes.sample(step["total"])

    def median(v):
        return float(np.median(v)) if v else None

    log(f"this machine's limits with {probes.threads} thread(s), sampled after each timed run: read bandwidth over "
        f"{step['total'] / 1e6:.0f} MB {', '.join(f'{v:.1f}' for v in probes.read)} GB/s; "
        + "; ".join(f"ONNX Runtime GEMM ({k}) {', '.join(f'{v:.0f}' for v in vs)} GFLOP/s" for k, vs in probes.gemm.items()))
    dkind, vkind = probes.kinds["decoder"], probes.kinds["vision"]
    read, peak, vpeak = median(probes.read), median(probes.gemm[dkind]), median(probes.gemm[vkind])
    counted = {c: matmul_flops(manifest.component_file(c)) for c in ("decoder", "vision_encoder", "projector") if c in manifest.components}
    flops = {c: (v[0] if v else None) for c, v in counted.items()}
    lim = Limits(probes.threads, step, read, peak, dkind, flops, vision_gemm_peak_gflops=vpeak, vision_gemm_kind=vkind,
                 read_gbps_samples=list(probes.read), gemm_peak_samples={k: list(v) for k, v in probes.gemm.items()})
    lim.decode_gbps = step["total"] * decode_tok_s / GB
    if flops.get("decoder") is not None and rows.get("decoder") and timings_ms.get("prefill"):
        head = counted["decoder"][1]  # the LM head runs on the last position alone
        lim.prefill_flops = (flops["decoder"] - head) * rows["decoder"] + head
        lim.prefill_gflops = lim.prefill_flops / (timings_ms["prefill"] / 1e3) / 1e9
    vis = [c for c in ("vision_encoder", "projector") if flops.get(c) is not None]
    if vis and rows.get("vision_encoder") and timings_ms.get("vision"):
        # the projector's rows are merged patches; it is timed as its own stage, so vision counts the encoder alone
        lim.vision_flops = flops["vision_encoder"] * rows["vision_encoder"] if flops.get("vision_encoder") is not None else None
        if lim.vision_flops:
            lim.vision_gflops = lim.vision_flops / (timings_ms["vision"] / 1e3) / 1e9
    return lim


if __name__ == "__main__":
    _probe_worker()
