"""`mmexport.bench` on the tiny build: the exported model against transformers' eager model."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from mmexport.bench import STAGES, BenchReport, bench, bench_builds, default_image, plot_bench, render_bench, render_builds
from mmexport.errors import UserError

NEW, REPEAT = 8, 2


LOGS: dict[str, list[str]] = {}


def _runs_in_order(lines: list[str]) -> list[str]:
    """'ours 1', 'eager 1', ... from the bench's log lines, in the order the timed runs happened."""
    out = []
    for line in lines:
        words = line.split()
        if len(words) > 2 and words[0] in ("ours", "eager") and words[1] == "run":
            out.append(f"{words[0]} {words[2].split('/')[0]}")
    return out


@pytest.fixture(scope="module")
def report(tiny_artifacts) -> BenchReport:
    LOGS["interleaved"] = []
    return bench(tiny_artifacts, prompt="What is in the picture?", new_tokens=NEW, repeat=REPEAT, warmup=1,
                 vs_pytorch=True, log=LOGS["interleaved"].append)


def test_interleaved_by_default_sequential_on_request(report, tiny_artifacts):
    assert report.machine["interleaved"] is True
    assert _runs_in_order(LOGS["interleaved"]) == ["ours 1", "eager 1", "ours 2", "eager 2"]
    lines: list[str] = []
    seq = bench(tiny_artifacts, new_tokens=3, repeat=2, warmup=0, vs_pytorch=True, interleave=False, log=lines.append)
    assert seq.machine["interleaved"] is False
    assert _runs_in_order(lines) == ["ours 1", "ours 2", "eager 1", "eager 2"]
    for r in (report, seq):  # memory is reported for both sides either way
        for side in (r.ours, r.eager):
            assert side.memory.peak_mb >= side.memory.loaded_mb * 0.9
            # a rise over the baseline; in the sequential run (after the interleaved one) the allocator may hand the
            # previous models' memory back to the OS while this side loads, so its baseline can sit above it
            assert side.memory.peak_delta_mb > 0 or r is seq
    # interleaved: the eager side was loaded next to the exported model, so its baseline holds it
    assert report.eager.memory.baseline_mb > report.ours.memory.baseline_mb


def test_structure_and_json(report):
    d = json.loads(json.dumps(report.to_dict()))
    for key in ("artifacts", "backend", "precision", "recipe", "image", "prompt", "new_tokens", "repeat", "warmup",
                "machine", "ours", "eager", "ratios", "agreement", "reference"):
        assert key in d, key
    assert d["recipe"] == "qwen2-vl-tiny" and d["precision"] == "fp32" and d["backend"] == "ort"
    assert d["image"] == "generated 448x448" and d["image_size"] == [448, 448]
    for side in ("ours", "eager"):
        s = d[side]
        assert set(s["timings_ms"]) == set(STAGES) - {"cross_kv"}  # Method A: no cross-attention K/V stage
        assert set(s["memory"]) >= {"baseline_mb", "loaded_mb", "peak_mb", "peak_delta_mb"}
        assert len(s["decode_tokens_per_s"]["samples"]) == REPEAT
    # one image: vision once, the decoder once per generated token (prefill included)
    assert d["ours"]["calls_per_request"] == {"vision_encoder": 1, "projector": 1, "embed_tokens": NEW, "decoder": NEW}
    m = d["machine"]
    assert m["cpu_count"] >= 1 and m["onnxruntime"] and m["torch"] and m["platform"]
    assert d["reference"]["same_as_build"] is True


def test_timings_positive_and_medians(report):
    for side in (report.ours, report.eager):
        for name, st in [*side.timings_ms.items(), ("tok/s", side.tokens_per_s)]:
            assert len(st.samples) == REPEAT, (side.name, name)
            assert all(x > 0 for x in st.samples), (side.name, name, st.samples)
            assert st.min <= st.median <= st.max
            assert st.median == pytest.approx(statistics.median(st.samples))
        for i in range(REPEAT):
            assert side.timings_ms["total"].samples[i] >= side.timings_ms["ttft"].samples[i]
            # decode throughput: the tokens after the first over the decode time
            assert side.tokens_per_s.samples[i] == pytest.approx((NEW - 1) / (side.timings_ms["decode"].samples[i] / 1e3), rel=1e-6)


def test_stages_are_the_runners_own_time(tiny_artifacts):
    """Each runner times its own inferences, and a stage is its component's time: a vision encoder made
    250 ms slower shows up in `vision` (and TTFT), not in `prefill` or `projector`."""
    import time

    from mmexport.runtime.pipeline import Pipeline

    pipe = Pipeline(tiny_artifacts)
    img = default_image(224)

    def fastest() -> dict[str, float]:  # per stage, the least of 3 runs (this machine is shared)
        runs = [pipe.generate("Describe.", [img], max_new_tokens=2).timings_ms for _ in range(3)]
        return {k: min(r[k] for r in runs) for k in runs[0]}

    before = fastest()
    runner = pipe.runners["vision_encoder"]
    inner = runner._infer
    runner._infer = lambda feed: (time.sleep(0.25), inner(feed))[1]
    after = fastest()
    pipe.close()
    assert after["vision"] - before["vision"] >= 225  # 250 ms slept, less the run-to-run noise of a shared machine
    assert after["ttft"] - before["ttft"] >= 225
    assert abs(after["prefill"] - before["prefill"]) < 100 and abs(after["projector"] - before["projector"]) < 100


def test_tokens_memory_and_agreement(report):
    for side in (report.ours, report.eager):
        assert side.tokens_generated == NEW and len(side.token_ids) == NEW
        assert side.memory.peak_mb > 0 and side.memory.baseline_mb > 0
        assert side.memory.peak_delta_mb == pytest.approx(side.memory.peak_mb - side.memory.baseline_mb)
    assert report.ours.prompt_tokens == report.eager.prompt_tokens
    a = report.agreement
    assert a["first_token"] is True and a["identical"] is True and a["common_prefix"] == NEW  # fp32 build: greedy parity


def test_ratios_consistent(report):
    r = report.ratios
    o, e = report.ours, report.eager
    assert r["decode_speedup"] == pytest.approx(o.tokens_per_s.median / e.tokens_per_s.median)
    assert r["ttft_ratio"] == pytest.approx(o.timings_ms["ttft"].median / e.timings_ms["ttft"].median)
    for k in o.timings_ms:
        assert r[f"{k}_ratio"] == pytest.approx(o.timings_ms[k].median / e.timings_ms[k].median)
    d = report.to_dict()
    assert d["ratios"]["decode_speedup"] == pytest.approx(d["ours"]["decode_tokens_per_s"]["median"] / d["eager"]["decode_tokens_per_s"]["median"], rel=1e-2)


def test_render(report):
    from rich.console import Console

    c = Console(record=True, width=200)
    render_bench(report, c)
    text = c.export_text()
    assert "decode tok/s" in text and "ttft" in text and "speed-up" in text and "peak" in text


def test_plot(report, tmp_path):
    pytest.importorskip("matplotlib")
    p = plot_bench(report, tmp_path / "bench.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_bench(report, tmp_path / "bench.png")


def test_ours_only_with_image_file(tiny_artifacts, tmp_path):
    img = tmp_path / "pic.png"
    default_image(200).save(img)
    r = bench(tiny_artifacts, image=img, new_tokens=3, repeat=1, warmup=0, log=lambda m: None)
    assert r.eager is None and r.ratios is None and r.agreement is None
    assert r.ours.tokens_generated == 3 and r.image == str(img) and r.image_size == [200, 200]
    assert json.loads(json.dumps(r.to_dict()))["eager"] is None


def test_bad_arguments(tiny_artifacts):
    with pytest.raises(UserError):
        bench(tiny_artifacts, new_tokens=0, log=lambda m: None)
    with pytest.raises(UserError, match="context"):
        bench(tiny_artifacts, new_tokens=10_000, repeat=1, warmup=0, log=lambda m: None)


def test_limits_of_this_machine(report, tiny_artifacts):
    """bench measures this machine's read bandwidth and GEMM peak and states what a decode step reads and what
    prefill computes, from the build itself: checked here against the files and the checkpoint's config."""
    from pathlib import Path

    lim = report.to_dict()["limits"]
    m = json.loads((tiny_artifacts / "manifest.json").read_text())
    dec = m["components"]["decoder"]
    tc = json.loads((Path(m["source"]["path"]) / "config.json").read_text())["text_config"]
    h, layers, heads, kv, inter, vocab = (tc[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "intermediate_size", "vocab_size"))
    hd = h // heads
    assert lim["decode_bytes"]["weights"] == sum((tiny_artifacts / r).stat().st_size for r in [dec["file"], *dec["data_files"]])
    # ONNX Runtime is fed the filled slots: the prompt and, on average, half of the new tokens
    slots = report.ours.prompt_tokens + NEW // 2
    assert lim["decode_bytes"]["kv_cache"] == layers * 2 * kv * hd * slots * 4
    assert lim["decode_bytes"]["embedding_row"] == h * 4
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter  # q, k, v, o, gate/up/down
    assert lim["flops_per_row"]["decoder"] == 2 * (layers * per_layer + h * vocab)  # + the LM head
    head = 2 * h * vocab  # the LM head runs on the last position only
    assert lim["prefill_flops"] == (lim["flops_per_row"]["decoder"] - head) * report.ours.prompt_tokens + head
    assert lim["read_gbps"] > 0 and lim["gemm_peak_gflops"] > 0 and lim["threads"] >= 1
    # the limits are sampled after each timed run, and each is the median of its samples
    assert len(lim["read_gbps_samples"]) == REPEAT and all(v > 0 for v in lim["read_gbps_samples"])
    assert lim["read_gbps"] == pytest.approx(statistics.median(lim["read_gbps_samples"]), abs=0.01)
    assert list(lim["gemm_peak_samples"]) == ["float32 MatMul"] and len(lim["gemm_peak_samples"]["float32 MatMul"]) == REPEAT
    assert lim["gemm_peak_gflops"] == pytest.approx(statistics.median(lim["gemm_peak_samples"]["float32 MatMul"]), abs=0.01)
    # an unquantized build: prefill and vision are both judged against the float32 GEMM, measured once
    assert lim["gemm_kind"] == lim["vision_gemm_kind"] == "float32 MatMul"
    assert lim["vision_gemm_peak_gflops"] == lim["gemm_peak_gflops"]
    assert lim["decode_gbps"] == pytest.approx(lim["decode_bytes"]["total"] * report.ours.tokens_per_s.median / 1e9, rel=1e-2)
    assert 0 < lim["percent_of_limit"]["decode"] and 0 < lim["percent_of_limit"]["prefill"] and 0 < lim["percent_of_limit"]["vision"]


def test_profile_one_decode_step(tiny_artifacts):
    """bench --profile: the host-side parts add up to the measured step, and ONNX Runtime's profiler sees every
    weight MatMul of the decoder (their weight bytes are the graph's) inside the decoder's run."""
    import onnx

    from conftest import run_cli
    from mmexport.bench.profile import HOST_PARTS

    p = run_cli("bench", tiny_artifacts, "--profile", "--new-tokens", "6", "--json")
    d = json.loads(p.stdout)
    assert d["steps"] == 6 and d["prompt_tokens"] > 0
    assert set(d["host_ms"]) == set(HOST_PARTS)
    assert sum(d["host_ms"].values()) == pytest.approx(d["step_ms"], rel=1e-6)
    for k in HOST_PARTS[:-1]:
        assert d["host_ms"][k] >= 0
    assert 0 < d["host_ms"]["decoder run"] < d["step_ms"]
    assert d["kernels_ms"] <= d["profiled_run_ms"]
    assert sum(o["ms"] for o in d["ops"]) == pytest.approx(d["kernels_ms"], rel=1e-6)
    model = onnx.load(str(tiny_artifacts / "onnx" / "decoder.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    stored = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert sum(w["nodes"] for w in d["weights"]) == len(stored)
    assert sum(w["mb"] for w in d["weights"]) == pytest.approx(
        sum(4 * inits[n.input[1]].dims[0] * inits[n.input[1]].dims[1] for n in stored) / 1e6, rel=1e-6)
    # the weight kernels alone: every one of them, the same bytes, timed unprofiled
    a = d["weights_alone"]
    assert a["nodes"] == len(stored) and a["weight_bytes"] == pytest.approx(sum(w["mb"] for w in d["weights"]) * 1e6, rel=1e-6)
    assert a["ms"] > 0 and a["gbps"] == pytest.approx(a["weight_bytes"] / 1e9 / (a["ms"] / 1e3), rel=1e-6)
    assert a["read_gbps"] > 0 and a["percent_of_read"] == pytest.approx(100 * a["gbps"] / a["read_gbps"], rel=1e-6)
    assert len(a["read_gbps_samples"]) == 3 and a["read_gbps"] == pytest.approx(statistics.median(a["read_gbps_samples"]), abs=0.01)
    text = run_cli("bench", tiny_artifacts, "--profile", "--new-tokens", "3").stdout
    assert "inside the decoder's run" in text and "MatMul" in text and "weight kernels alone" in text
    run_cli("bench", tiny_artifacts, "--profile", "--vs-pytorch", check=2)


def test_limit_probes_run_in_their_own_process(tiny_artifacts):
    """The limits are sampled in a child process: the GEMM session (and the onnx package it is built with) and the
    read buffer never enter the benchmarked process, and closing the probes ends the child."""
    import os
    import subprocess

    script = r"""
import sys
from mmexport.bench.limits import LimitProbes
from mmexport.runtime.manifest import load_manifest
probes = LimitProbes(load_manifest(sys.argv[1], check_files=False))
for _ in range(2):
    probes.sample(64 << 20)
pid = probes._proc.pid
probes.close()
print(len(probes.read), min(probes.read) > 0, {k: len(v) for k, v in probes.gemm.items()}, probes.kinds["decoder"],
      "onnx" in sys.modules, probes._proc.returncode, pid != __import__("os").getpid())
"""
    p = subprocess.run([sys.executable, "-c", script, str(tiny_artifacts)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300)
    assert p.stdout.split() == ["2", "True", "{'float32", "MatMul':", "2}", "float32", "MatMul", "False", "0", "True"], p.stderr



@pytest.fixture(scope="module")
def tiny_int8(tiny_artifacts, tmp_path_factory) -> Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("build") / "qwen2-vl-tiny-int8"
    run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--out", out)
    return out


def test_builds_compared_with_their_runs_interleaved(tiny_artifacts, tiny_int8):
    """Several builds on one request: all loaded, run i of each in the order given, then run i + 1; a report per
    build with its own limits. The fp32 build given twice is an A/A comparison: the same greedy tokens."""
    from rich.console import Console

    lines: list[str] = []
    reps = bench_builds([tiny_artifacts, tiny_int8, tiny_artifacts], new_tokens=4, repeat=2, warmup=0, log=lines.append)
    runs = [f"{w[1]}.{w[3].split('/')[0]}" for w in (line.split() for line in lines) if len(w) > 3 and w[0] == "build" and w[2] == "run"]
    assert runs == ["1.1", "2.1", "3.1", "1.2", "2.2", "3.2"]
    assert [r.artifacts for r in reps] == [str(tiny_artifacts), str(tiny_int8), str(tiny_artifacts)]
    assert all(r.machine["interleaved"] and len(r.ours.tokens_per_s.samples) == 2 for r in reps)
    assert reps[0].quantization == "" and reps[1].quantization == "int8 blockwise, blocks of 32"
    assert reps[0].ours.token_ids == reps[2].ours.token_ids and len(reps[1].ours.token_ids) == 4
    # each build's limits judge its own bytes: the int8 decoder reads fewer weight bytes than the fp32 one
    b = [r.limits.decode_bytes["weights"] for r in reps]
    assert b[1] < b[0] == b[2] and all(len(r.limits.read_gbps_samples) == 2 for r in reps)
    assert all(r.ours.memory.peak_mb > 0 for r in reps)
    con = Console(record=True, width=400)
    render_builds(reps, con)
    text = con.export_text()
    assert "3 builds, timed runs interleaved" in text and "fp32 + int8 blockwise, blocks of 32" in text and "4/4" in text
    with pytest.raises(UserError, match="two artifact directories"):
        bench_builds([tiny_artifacts], log=lambda m: None)


def test_cli_compares_builds(tiny_artifacts, tiny_int8):
    from conftest import run_cli

    p = run_cli("bench", tiny_artifacts, tiny_int8, "--new-tokens", "2", "--repeat", "1", "--warmup", "0", "--no-limits", "--json")
    d = json.loads(p.stdout)
    assert d["interleaved"] is True and [b["artifacts"] for b in d["builds"]] == [str(tiny_artifacts), str(tiny_int8)]
    assert d["builds"][1]["quantization"].startswith("int8") and d["builds"][0]["limits"] is None
    for extra in (["--vs-pytorch"], ["--profile"], ["--concurrency", "2"]):
        p = run_cli("bench", tiny_artifacts, tiny_int8, *extra, check=2)
        assert p.stdout == "" and p.stderr.strip().splitlines()[-1].startswith("error: several builds are compared on their own")
