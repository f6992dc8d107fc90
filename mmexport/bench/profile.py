"""`mmexport bench DIR --profile`: where one decode step's time goes.

Two views of the same request (the bench image and prompt, greedy, EOS ignored), after a warm-up:

- the host side, from the runtime's own clocks (`Pipeline.generate` timings): per step, the decoder's and
  the embedding's `session.run`, the feed checks against the declarations, the KV cache writes, sampling,
  incremental detokenization, and the rest of the Python loop;
- inside the decoder's run, ONNX Runtime's profiler (a second decoder session with profiling on, swapped
  into the same pipeline): kernel time per op type, and per weight-reading MatMul shape its time and the
  GB/s its weight bytes imply. The profiler adds a fixed cost per kernel, so its run time is longer than
  the unprofiled step; the table shows both;
- the weight kernels alone: the decoder's weight-reading nodes (MatMul / Gemm / MatMulNBits / MatMulInteger
  on a stored weight), cut out into a graph of their own that reads the same stored weights (no copy), run
  unprofiled with the decoder's session options on one decode row. Its time is the floor ONNX Runtime's
  kernels put under a decode step, and its GB/s next to the machine's read bandwidth (measured here, same
  threads, over the same bytes, after each of three rounds of the timing: the median) says how much of a gap to the bandwidth limit is the weight kernels' own
  and how much is the rest of the graph (attention, norms, rotary, reshapes and the ~1,000 small kernels).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HOST_PARTS = ("decoder run", "embedding run", "feed checks", "cache write", "sample", "detokenize", "other host")


@dataclass
class DecodeProfile:
    artifacts: str
    steps: int
    prompt_tokens: int
    threads: int
    step_ms: float  # unprofiled: decode time per generated token
    host_ms: dict[str, float]  # per step, HOST_PARTS
    profiled_run_ms: float  # the decoder's run under the profiler, per step
    kernels_ms: float  # sum of kernel times per step (profiled)
    nodes_per_step: int
    ops: list[dict[str, Any]] = field(default_factory=list)  # op type: ms per step, kernels per step
    weights: list[dict[str, Any]] = field(default_factory=list)  # MatMul shape: ms per step, bytes, GB/s
    weights_alone: dict[str, Any] | None = None  # the weight kernels as a graph of their own (weight_kernels_alone)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight_nodes(onnx_path_or_model) -> dict[str, tuple[str, int, int, int]]:
    """Node name -> (op, K, N, weight bytes per call) for the MatMul / Gemm / MatMulNBits nodes that read a
    stored weight (quantized weights count their scales and zero points)."""
    import numpy as np
    import onnx

    model = (onnx_path_or_model if isinstance(onnx_path_or_model, onnx.ModelProto)
             else onnx.load(str(onnx_path_or_model), load_external_data=False))
    sizes = {}
    for t in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        sizes[t.name] = (list(t.dims), int(np.prod(t.dims or [1])) * itemsize)
    out = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(n.input) > 1 and n.input[1] in sizes and len(sizes[n.input[1]][0]) == 2:
            (k, m), b = sizes[n.input[1]]
            if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
                k, m = m, k  # B stored as [N, K]
            out[n.name] = (n.op_type, k, m, b)
        elif n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            b = sum(sizes[i][1] for i in n.input[1:] if i in sizes)
            out[n.name] = (f"MatMulNBits {attrs.get('bits', 4)}-bit", int(attrs["K"]), int(attrs["N"]), b)
    return out


def weight_kernels_alone(onnx_path: Path, component: str = "decoder", runs: int = 30, warmup: int = 5,
                         threads: int | None = None, rounds: int = 1, between: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """Time the graph's weight-reading nodes on their own (one row of input each, as a batch-1 decode step
    feeds them): {"ms", "nodes", "weight_bytes", "gbps"} (median of `rounds` x `runs`, with `between(weight_bytes)`
    called after each round: a probe of the machine's limits sampled over the same minutes). The nodes keep their stored
    weights where they are (the cut-out graph is loaded from memory with the artifact's onnx/ folder as its
    external-data folder); every other input of theirs (activations, a dynamic quantizer's zero point) is a
    graph input fed random data. None when the graph has no such node."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ..runtime.backends import ort_session_options
    from .limits import run_times

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    shapes = _weight_nodes(model)
    if not shapes:
        return None
    graph_nodes = list(model.graph.node)  # one wrapper per node, so id() names it
    order = {id(n): i for i, n in enumerate(graph_nodes)}
    producer = {o: n for n in graph_nodes for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph_nodes:
        for i in n.input:
            consumers[i].append(n)
    # A dynamically quantized MatMul is DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scale), which ONNX
    # Runtime fuses into one kernel: the neighbours go with it (alone, MatMulInteger runs a slow generic path).
    picked: dict[int, Any] = {}  # graph order -> node
    widths: dict[str, int] = {}  # float activation inputs -> K
    for n in graph_nodes:
        if n.name not in shapes:
            continue
        k = shapes[n.name][1]
        picked[order[id(n)]] = n
        src = producer.get(n.input[0])
        if n.op_type == "MatMulInteger" and src is not None and src.op_type == "DynamicQuantizeLinear":
            picked[order[id(src)]] = src
            widths[src.input[0]] = k
            out = n.output[0]
            for _ in range(2):
                nxt = consumers.get(out, [])
                if len(nxt) != 1 or nxt[0].op_type not in ("Cast", "Mul"):
                    break
                picked[order[id(nxt[0])]] = nxt[0]
                if nxt[0].op_type == "Mul":
                    for i in nxt[0].input:
                        sp = producer.get(i)
                        if sp is not None and sp.op_type == "Mul":
                            picked[order[id(sp)]] = sp
                out = nxt[0].output[0]
        else:
            widths[n.input[0]] = k
    made = {o for n in picked.values() for o in n.output}
    nodes = [picked[i] for i in sorted(picked)]
    inputs, used, feeds = {}, {}, {}
    rng = np.random.default_rng(0)
    np_types = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    for n in nodes:
        for i, name in enumerate(n.input):
            if not name or name in made or name in inputs:
                continue
            if name in inits:
                used[name] = inits[name]
                continue
            if name not in widths:  # not an activation row: nothing this cut-out graph can feed honestly
                return None
            if n.op_type == "MatMulNBits":
                et = inits[n.input[2]].data_type
            elif n.op_type in ("MatMul", "Gemm"):
                et = inits[n.input[1]].data_type
            else:
                et = TensorProto.FLOAT
            if et not in np_types:
                return None
            inputs[name] = helper.make_tensor_value_info(name, et, [1, widths[name]])
            feeds[name] = (rng.standard_normal((1, widths[name])) * 0.5).astype(np_types[et])
    outputs = [onnx.ValueInfoProto(name=o) for n in nodes for o in n.output
               if o and not any(order[id(c)] in picked for c in consumers.get(o, []))]
    graph = helper.make_graph(nodes, "weight_kernels_alone", list(inputs.values()), outputs, list(used.values()))
    cut = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    so = ort_session_options(component, threads)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(onnx_path).parent))
    sess = ort.InferenceSession(cut.SerializeToString(), so, providers=["CPUExecutionProvider"])
    nbytes = sum(shapes[n.name][3] for n in nodes if n.name in shapes)
    times: list[float] = []
    for r in range(rounds):
        times += run_times(sess, feeds, runs, warmup if r == 0 else 0)
        if between is not None:
            between(nbytes)
    ms = float(np.median(times)) * 1e3
    del sess
    return {"ms": ms, "nodes": sum(n.name in shapes for n in nodes), "weight_bytes": nbytes, "gbps": nbytes / 1e9 / (ms / 1e3)}


def profile_decode(artifact_dir: Path | str, images: list, prompt: str, steps: int = 32, backend: str = "ort",
                   log: Callable[[str], None] = print) -> DecodeProfile:
    from ..errors import UserError
    from ..runtime.backends import OrtRunner
    from ..runtime.pipeline import Pipeline
    from .limits import runtime_threads

    if backend != "ort":
        raise UserError("--profile reads ONNX Runtime's profiler: it needs --backend ort")
    pipe = Pipeline(artifact_dir, backend=backend)
    try:
        n = steps + 1  # the first token comes from the prefill
        log(f"profiling {steps} decode steps of {artifact_dir}: warm-up, one timed request, one profiled request")
        pipe.generate(prompt, images, max_new_tokens=n, ignore_eos=True)
        res = pipe.generate(prompt, images, max_new_tokens=n, ignore_eos=True)
        done = max(len(res.token_ids) - 1, 1)
        t = res.timings_ms
        host = {
            "decoder run": t.get("decode_run.decoder", 0.0),
            "embedding run": t.get("decode_run.embed_tokens", 0.0),
            "feed checks": sum(v for k, v in t.items() if k.startswith("decode_check.")),
            "cache write": t["decode_cache_write"],
            "sample": t["decode_sample"],
            "detokenize": t["decode_detokenize"],
        }
        host["other host"] = t["decode"] - sum(host.values())
        host = {k: v / done for k, v in host.items()}

        spec = pipe.specs["decoder"]
        path = pipe.manifest.component_file("decoder")
        with tempfile.TemporaryDirectory(prefix="mmexport-profile-") as tmp:
            old = pipe.runners["decoder"]
            old.deactivate()
            prof = OrtRunner(path, spec, manifest=pipe.manifest, profile_prefix=os.path.join(tmp, "decoder")).activate()
            pipe.runners["decoder"] = prof
            pipe.generate(prompt, images, max_new_tokens=n, ignore_eos=True)
            trace = json.loads(Path(prof.end_profiling()).read_text())
            prof.deactivate()
    finally:
        pipe.close()
    from .limits import measure_read_bandwidth

    reads: list[float] = []

    def probe(nbytes: int) -> None:  # the read bandwidth over the same bytes, after each round of the kernels' timing
        time.sleep(0.1)  # the session's pool spins a moment after its run
        reads.append(measure_read_bandwidth(nbytes, runtime_threads(), passes=3))

    alone = weight_kernels_alone(path, rounds=3, runs=10, between=probe)
    if alone:
        alone["read_gbps"] = statistics.median(reads)
        alone["read_gbps_samples"] = [round(v, 2) for v in reads]
        alone["percent_of_read"] = 100 * alone["gbps"] / alone["read_gbps"]
        alone["rest_ms"] = max(host["decoder run"] - alone["ms"], 0.0)

    runs = [e for e in trace if e.get("name") == "model_run"]
    runs = runs[1:]  # the first run is the prefill
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    kernels = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
               and any(a <= e["ts"] <= b for a, b in spans)]
    k = max(len(runs), 1)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op][0] += e["dur"] / 1e3
        by_op[op][1] += 1
    kernel_ms = sum(v[0] for v in by_op.values()) / k
    ops = [{"op": op, "ms": ms / k, "kernels": cnt // k, "share": ms / k / kernel_ms if kernel_ms else 0.0}
           for op, (ms, cnt) in sorted(by_op.items(), key=lambda kv: -kv[1][0])]
    shapes = _weight_nodes(path)
    by_shape: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for e in kernels:
        w = shapes.get(e["name"][: -len("_kernel_time")])
        if w:
            acc = by_shape[w[:3]]
            acc[0] += e["dur"] / 1e3
            acc[1] += 1
            acc[2] += w[3]
    weights = [{"op": op, "K": kk, "N": nn, "ms": ms / k, "nodes": cnt // k, "mb": b / k / 1e6,
                "gbps": (b / 1e9) / (ms / 1e3) if ms else 0.0}
               for (op, kk, nn), (ms, cnt, b) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])]
    return DecodeProfile(
        artifacts=str(artifact_dir), steps=done, prompt_tokens=res.prompt_tokens, threads=runtime_threads(),
        step_ms=t["decode"] / done, host_ms=host, profiled_run_ms=sum(r["dur"] for r in runs) / k / 1e3,
        kernels_ms=kernel_ms, nodes_per_step=len(kernels) // k, ops=ops, weights=weights, weights_alone=alone,
    )


def render_profile(p: DecodeProfile, console) -> None:
    from rich.table import Table

    t = Table("host side, per decode step", "ms", "share", title=f"decode step of {p.artifacts}: {p.step_ms:.2f} ms "
              f"({1e3 / p.step_ms:.1f} tok/s), mean of {p.steps} steps after {p.prompt_tokens} prompt tokens, {p.threads} thread(s)")
    for k in HOST_PARTS:
        t.add_row(k, f"{p.host_ms[k]:.3f}", f"{100 * p.host_ms[k] / p.step_ms:.1f} %")
    console.print(t)
    t = Table("op type", "ms per step", "kernels", "share of kernel time",
              title=f"inside the decoder's run (ONNX Runtime profiler): run {p.profiled_run_ms:.2f} ms profiled "
                    f"(unprofiled {p.host_ms['decoder run']:.2f} ms), kernels {p.kernels_ms:.2f} ms, {p.nodes_per_step} kernels")
    for o in p.ops[:15]:
        t.add_row(o["op"], f"{o['ms']:.3f}", str(o["kernels"]), f"{100 * o['share']:.1f} %")
    if len(p.ops) > 15:
        rest = p.ops[15:]
        t.add_row(f"{len(rest)} other op types", f"{sum(o['ms'] for o in rest):.3f}", str(sum(o["kernels"] for o in rest)),
                  f"{100 * sum(o['share'] for o in rest):.1f} %")
    console.print(t)
    if p.weights:
        t = Table("weight MatMul", "K x N", "nodes", "ms per step", "MB per step", "GB/s", title="kernels that read stored weights")
        for w in p.weights:
            t.add_row(w["op"], f"{w['K']} x {w['N']}", str(w["nodes"]), f"{w['ms']:.3f}", f"{w['mb']:.1f}", f"{w['gbps']:.1f}")
        console.print(t)
    a = p.weights_alone
    if a:
        console.print(f"weight kernels alone ({a['nodes']} nodes, {a['weight_bytes'] / 1e6:.0f} MB, unprofiled): "
                      f"{a['ms']:.2f} ms = {a['gbps']:.1f} GB/s, {a['percent_of_read']:.0f} % of this machine's read "
                      f"bandwidth ({a['read_gbps']:.1f} GB/s, the median of {len(a['read_gbps_samples'])} samples between rounds of the timing: "
                      f"{min(a['read_gbps_samples']):.1f}-{max(a['read_gbps_samples']):.1f}); the rest of the decoder's run: {a['rest_ms']:.2f} ms "
                      f"of {p.host_ms['decoder run']:.2f}", highlight=False)
