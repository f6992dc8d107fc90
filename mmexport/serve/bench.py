"""`mmexport bench DIR --concurrency 1,4,8`: the serving engine under N concurrent streams (torch-free).

Each stream is a client that sends a request (prompt + image), waits for the whole answer, and sends
the next, `requests` times; N such clients run at once against one engine with `max_batch` slots. Every
request generates exactly `new_tokens` tokens (EOS ignored), so levels compare like for like. Reported
per level: total generated tokens/s over the wall time (prefills included), the decode rate of all
streams together over the time spent in batched decoder steps and the mean step time, each stream's
decode rate, time to first token
(from the request's arrival, preprocessing included) p50/p95, the mean rows per decoder step, and the
machine's load average around the run (a busy machine is visible in the table, not hidden in it).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    stream_decode_tok_s: float  # median over requests: (tokens - 1) / (last token - first token)
    ttft_p50_ms: float
    ttft_p95_ms: float
    mean_batch_rows: float
    decode_tok_s: float  # all streams together, over the time spent in batched decode steps
    step_ms: float  # mean decoder step (all rows)
    load_before: float  # 1-minute load average
    load_after: float


@dataclass
class ServeBenchReport:
    artifacts: str
    slots: int
    new_tokens: int
    prompt_tokens: int
    images: int
    cpu_count: int
    levels: list[LevelResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = [asdict(lv) for lv in self.levels]
        return d


def _image(path: Path | None):
    from PIL import Image

    if path is not None:
        from ..runtime.image import load_image

        return load_image(path)
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))


def serve_bench(artifacts: Path, concurrency: Sequence[int], image: Path | None, prompt: str, new_tokens: int,
                requests: int = 2, max_batch: int | None = None, backend: str = "ort", text_only: bool = False,
                log: Callable[[str], None] = print) -> ServeBenchReport:
    from ..runtime.pipeline import Pipeline
    from .engine import Engine, Event, GenRequest

    pipe = Pipeline(artifacts, backend=backend)
    slots = max_batch or int(pipe.manifest.limits.get("max_batch", 1))
    images = [] if text_only else [_image(image)]
    probe = pipe.prepare(prompt, images)
    report = ServeBenchReport(str(artifacts), slots, new_tokens, int(len(probe.input_ids)), len(images), os.cpu_count() or 0)
    engine = Engine(pipe, slots, max_queue=max(concurrency) * 2).start()

    def one(stats: list[dict[str, float]]) -> None:
        t0 = time.perf_counter()
        prep = pipe.prepare(prompt, images)
        done = threading.Event()
        times: list[float] = []

        def cb(ev: Event) -> None:
            if ev.kind == "text" and ev.token_id is not None:
                times.append(time.perf_counter())
            elif ev.kind in ("done", "error"):
                if ev.kind == "error":
                    log(f"request failed: {ev.message}")
                done.set()

        engine.submit(GenRequest(prep, new_tokens, on_event=cb, submitted=t0, ignore_eos=True))
        done.wait()
        if times:
            stats.append({"ttft": times[0] - t0, "tokens": len(times),
                          "decode": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0})

    try:
        log("warm-up request")
        one([])
        for n in concurrency:
            stats: list[dict[str, float]] = []
            steps0, rows0, sec0 = engine.steps, engine.rows_served, engine.step_seconds
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            clients = [threading.Thread(target=lambda: [one(stats) for _ in range(requests)]) for _ in range(n)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            wall = time.perf_counter() - t0
            ttft = np.array([s["ttft"] for s in stats]) * 1e3
            tokens = int(sum(s["tokens"] for s in stats))
            steps, rows, sec = engine.steps - steps0, engine.rows_served - rows0, engine.step_seconds - sec0
            lv = LevelResult(n, len(stats), tokens, round(wall, 3), round(tokens / wall, 2),
                             round(float(np.median([s["decode"] for s in stats])), 2),
                             round(float(np.percentile(ttft, 50)), 1), round(float(np.percentile(ttft, 95)), 1),
                             round(rows / steps, 2) if steps else 0.0, round(rows / sec, 2) if sec else 0.0,
                             round(sec / steps * 1e3, 1) if steps else 0.0,
                             round(load0, 2), round(os.getloadavg()[0], 2))
            report.levels.append(lv)
            log(f"concurrency {n}: {lv.tokens_per_s} tok/s total, decode {lv.decode_tok_s} tok/s ({lv.step_ms} ms/step), TTFT p50 {lv.ttft_p50_ms} ms p95 {lv.ttft_p95_ms} ms, "
                f"{lv.mean_batch_rows} rows/step (load {lv.load_before} -> {lv.load_after})")
    finally:
        engine.stop()
        pipe.close()
    return report


def render_serve_bench(report: ServeBenchReport, console) -> None:
    from rich.table import Table

    t = Table("streams", "requests", "total tok/s", "decode tok/s", "ms/step", "per-stream decode tok/s", "TTFT p50", "TTFT p95",
              "rows/step", "load 1m",
              title=f"{report.artifacts}: {report.slots} slots, {report.prompt_tokens} prompt tokens ({report.images} image), "
                    f"{report.new_tokens} new tokens per request, {report.cpu_count} CPUs")
    for lv in report.levels:
        t.add_row(str(lv.concurrency), str(lv.requests), f"{lv.tokens_per_s:.1f}", f"{lv.decode_tok_s:.1f}", f"{lv.step_ms:.1f}",
                  f"{lv.stream_decode_tok_s:.1f}",
                  f"{lv.ttft_p50_ms:.0f} ms", f"{lv.ttft_p95_ms:.0f} ms", f"{lv.mean_batch_rows:.2f}",
                  f"{lv.load_before:.1f} -> {lv.load_after:.1f}")
    console.print(t)
