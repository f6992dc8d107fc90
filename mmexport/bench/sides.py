"""A side of the bench: one implementation loaded, warmed up and timed on single requests; and the
exported model's side (the torch-free runtime)."""
from __future__ import annotations

import gc
import time

import numpy as np
from typing import Any, Callable

from ..errors import UserError
from .memory import MB, RssMonitor, rss_bytes
from .results import STAGES, Memory, SideResult, Stats


def collect(runs: list[dict[str, float]]) -> dict[str, Stats]:
    """Stats per stage over the runs, for the stages (of STAGES) the runs report."""
    return {k: Stats([r[k] for r in runs]) for k in STAGES if k in runs[0]}


class Side:
    """One implementation under test: load it, warm it up, time single requests, release it.

    Memory: `baseline` is the RSS before loading (the framework already imported), `loaded` after,
    `settled` after the warm-up runs (transformers mmaps its weights, so they become resident there);
    each timed run records the RSS before it and the peak during it."""

    label = ""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.runs: list[dict[str, Any]] = []
        self.rss: list[tuple[int, int]] = []  # (before the run, peak during it) per timed run
        self.monitor_method = ""
        self.baseline = self.loaded = self.settled = 0
        self.load_s = 0.0
        self.last: dict[str, Any] = {}

    def load(self) -> None:
        self._prepare()
        gc.collect()
        self.baseline = rss_bytes()
        t0 = time.perf_counter()
        self._load()
        self.load_s = time.perf_counter() - t0
        self.loaded = rss_bytes()

    def warm(self, n: int) -> None:
        for _ in range(n):
            self._run()
        self.settled = rss_bytes()

    def timed_run(self, i: int, repeat: int) -> None:
        with RssMonitor() as mon:
            before = mon.peak
            out = self._run()
        self.rss.append((before, mon.peak))
        self.monitor_method = mon.method
        self.runs.append(out)
        self.last = out
        self.log(f"  {self.label} run {i + 1}/{repeat}: ttft {out['ttft']:.0f} ms, decode {out['tok_s']:.1f} tok/s")

    def memory(self, interleaved: bool) -> Memory:
        if interleaved:  # the other side's memory changes between this side's runs: count rises only
            peak = self.settled + max(max(p - b, 0) for b, p in self.rss)
            method = self.monitor_method + "; interleaved: RSS after load and warm-up + the largest rise during a run"
        else:
            peak, method = max(p for _, p in self.rss), self.monitor_method
        return Memory(self.baseline / MB, self.loaded / MB, peak / MB, method)

    def stats(self) -> tuple[dict[str, Stats], Stats]:
        return collect(self.runs), Stats([r["tok_s"] for r in self.runs])

    def _prepare(self) -> None:
        """What comes before the baseline and the load timing (framework imports, finding the checkpoint)."""

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OursSide(Side):
    label = "ours "

    def __init__(self, artifact_dir, backend: str, images, prompt: str, new_tokens: int, warmup: int, repeat: int, log,
                 probe: bool = False, label: str = "ours "):
        super().__init__(log)
        self.label = label
        # probe: after each timed run, sample this machine's limits (bench.limits.LimitProbes, a child process
        # started after the first timed run), so they are measured over the same minutes as the runs they judge
        self.probe = probe
        self.probes = None
        self.prompt_tokens = 0
        self.artifact_dir, self.backend, self.images, self.prompt, self.new_tokens = artifact_dir, backend, images, prompt, new_tokens
        self.warmup, self.repeat = warmup, repeat
        self.pipe = None
        self.manifest = None  # set by load(), which runs before the eager side's
        self.rows: dict[str, int] = {}

    def _prepare(self) -> None:
        if self.backend == "ort":  # the baseline includes the framework's libraries, as torch's for the eager side
            import onnxruntime  # noqa: F401

    def _load(self) -> None:
        from ..runtime.pipeline import Pipeline

        self.pipe = pipe = Pipeline(self.artifact_dir, backend=self.backend)
        self.manifest = pipe.manifest
        prep = pipe.prepare(self.prompt, self.images)
        self.prompt_tokens = len(prep.input_ids)
        if self.new_tokens > pipe.max_context - len(prep.input_ids):
            raise UserError(f"{len(prep.input_ids)} prompt tokens + {self.new_tokens} new tokens exceed this build's context of {pipe.max_context}")
        self.log(f"bench {self.artifact_dir} ({self.manifest.data.get('precision')}, {self.backend}): {len(prep.input_ids)} prompt tokens, "
                 f"{self.new_tokens} new tokens, {self.warmup} warm-up + {self.repeat} timed run(s)")

    def _run(self) -> dict[str, Any]:
        assert self.pipe is not None
        res = self.pipe.generate(self.prompt, self.images, max_new_tokens=self.new_tokens, ignore_eos=True)
        return {**{k: float(v) for k, v in res.timings_ms.items() if k in STAGES}, "tok_s": res.tokens_per_s, "res": res}

    def timed_run(self, i: int, repeat: int) -> None:
        super().timed_run(i, repeat)
        if self.probe:
            from .limits import LimitProbes, decode_step_bytes

            if self.probes is None:
                self.probes = LimitProbes(self.manifest)
            self.probes.sample(decode_step_bytes(self.manifest, self.kv_slots())["total"])

    def kv_slots(self) -> int | None:
        """The cache slots a decode step reads, on average over the request (the ONNX Runtime backend is fed the
        filled ones); None where the backend reads the whole buffer."""
        assert self.pipe is not None
        return None if self.pipe.runners["decoder"].whole_cache else self.prompt_tokens + self.new_tokens // 2

    def note_rows(self) -> None:
        """The input rows one request puts through the decoder (prompt tokens) and the vision encoder (its output
        tokens), for the FLOPs bench.limits reports; read while the model is loaded."""
        assert self.pipe is not None
        pipe = self.pipe
        prep = pipe.prepare(self.prompt, self.images)
        self.rows = {"decoder": len(prep.input_ids)}
        slots = self.kv_slots()
        if slots is not None:
            self.rows["kv_slots"] = slots
        if prep.images and hasattr(pipe.family, "vision_feeds"):
            out = pipe.runners["vision_encoder"].infer(pipe.family.vision_feeds(prep.images[0]))
            first = out[pipe.specs["vision_encoder"].output_names[0]]
            self.rows["vision_encoder"] = int(np.prod(first.shape[:-1])) * len(prep.images)

    def measure_limits(self):
        """This machine's limits for this build, as sampled beside the timed runs, and how close the median request
        came (bench.limits)."""
        from .limits import measure_limits

        assert self.probes is not None, "the limits are sampled by the timed runs (probe=True)"
        timings, tok_s = self.stats()
        return measure_limits(self.manifest, self.rows, {k: v.median for k, v in timings.items()}, tok_s.median, self.probes,
                              log=self.log)

    def close_probes(self) -> None:
        if self.probes is not None:
            self.probes.close()
            self.probes = None

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
            gc.collect()

    def result(self, interleaved: bool) -> SideResult:
        res = self.last["res"]
        timings, tok_s = self.stats()
        side = SideResult(
            name=f"exported ({self.backend})",
            timings_ms=timings,
            tokens_per_s=tok_s,
            tokens_generated=len(res.token_ids),
            prompt_tokens=res.prompt_tokens,
            token_ids=list(res.token_ids),
            memory=self.memory(interleaved),
            load_s=self.load_s,
            calls=dict(res.calls),
            notes=["load includes the sha256 check of the artifact files changed since their last check (.verified.json)",
                   "decode includes sampling and incremental detokenization, as `mmexport run`"],
        )
        if len(res.token_ids) != self.new_tokens:
            side.notes.append(f"generated {len(res.token_ids)} tokens, not {self.new_tokens} (stop reason: {res.stop_reason})")
        return side
