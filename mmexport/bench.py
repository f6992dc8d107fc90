"""`mmexport bench`: how fast is the exported model, and how does it compare with PyTorch eager?

For the artifact directory (the torch-free runtime, `Pipeline.generate`):
- time to first token, split into preprocess / vision / projector / prefill;
- decode throughput over exactly `new_tokens` greedy tokens (EOS ignored, so every run does the same
  work): tokens after the first, over the decode time, as `GenerationResult.tokens_per_s`;
- resident memory: a background thread samples the RSS during the timed runs (plus the kernel's
  high-water mark where Linux lets us reset it); the peak and its delta over the RSS before the model
  was loaded.
Warm-up runs are excluded; every figure is the median of `repeat` runs, with min and max kept.

With `vs_pytorch`, the same image and prompt go through transformers' eager model (float32,
attn_implementation="eager", the checkpoint the build was exported from, found as verify finds it) in
the same process, after the exported model has been released:
- preprocess: transformers' tokenizer + image processor (the adapter's `reference_inputs`; their
  `from_pretrained` loading is done once, as the runtime loads its tokenizer once);
- vision / projector: the vision tower (`get_image_features`); the merger is timed by hooks, the rest
  is "vision";
- prefill: the model's forward on the prompt with the image features, `use_cache=True`, last logits;
- decode: a greedy loop of single-token forwards on the returned cache, `new_tokens` tokens, EOS
  ignored, as `generate` decodes.
Ratios are ours / eager for times, ours / eager for tokens per second (the decode speed-up).

The exported side never imports torch; torch is imported only for `vs_pytorch`.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .runtime.backends import ort_spinning

# every stage a family may time, in pipeline order; a side reports the ones it has (cross_kv: Method B)
STAGES = ("preprocess", "vision", "projector", "cross_kv", "prefill", "ttft", "decode", "total")
DEFAULT_PROMPT = "Describe the image."
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """One measured quantity over the timed runs."""

    samples: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples)) if self.samples else 0.0

    @property
    def min(self) -> float:
        return float(min(self.samples)) if self.samples else 0.0

    @property
    def max(self) -> float:
        return float(max(self.samples)) if self.samples else 0.0

    def to_dict(self, nd: int = 3) -> dict[str, Any]:
        return {"median": round(self.median, nd), "min": round(self.min, nd), "max": round(self.max, nd),
                "samples": [round(s, nd) for s in self.samples]}


@dataclass
class Memory:
    """Resident set size (MB): before the model was loaded (its framework already imported), after
    loading, and the peak during the timed runs. Loading mmaps weights lazily in transformers, so
    `loaded_mb` can be far below the weights' size there; the peak is the comparable figure."""

    baseline_mb: float
    loaded_mb: float
    peak_mb: float
    method: str

    @property
    def peak_delta_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_mb": round(self.baseline_mb, 1), "loaded_mb": round(self.loaded_mb, 1),
                "peak_mb": round(self.peak_mb, 1), "peak_delta_mb": round(self.peak_delta_mb, 1), "method": self.method}


@dataclass
class SideResult:
    """The figures of one implementation (the exported model, or PyTorch eager)."""

    name: str
    timings_ms: dict[str, Stats]
    tokens_per_s: Stats
    tokens_generated: int
    prompt_tokens: int
    token_ids: list[int]
    memory: Memory
    load_s: float
    calls: dict[str, int] = field(default_factory=dict)  # component -> inferences per request
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "timings_ms": {k: v.to_dict() for k, v in self.timings_ms.items()},
            "decode_tokens_per_s": self.tokens_per_s.to_dict(),
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "token_ids": self.token_ids,
            "memory": self.memory.to_dict(),
            "load_s": round(self.load_s, 3),
            "calls_per_request": self.calls,
            "notes": self.notes,
        }


@dataclass
class BenchReport:
    artifacts: str
    backend: str
    precision: str
    recipe: str
    image: str
    image_size: list[int] | None
    prompt: str
    new_tokens: int
    repeat: int
    warmup: int
    machine: dict[str, Any]
    ours: SideResult
    eager: SideResult | None = None
    reference: dict[str, Any] | None = None  # checkpoint of the eager side
    seconds: float = 0.0

    @property
    def ratios(self) -> dict[str, float] | None:
        """ours / eager per stage (below 1: ours is faster); decode_speedup = ours tok/s / eager tok/s."""
        if self.eager is None:
            return None
        r: dict[str, float] = {}
        for k in STAGES:
            if k not in self.ours.timings_ms or k not in self.eager.timings_ms:
                continue
            a, b = self.ours.timings_ms[k].median, self.eager.timings_ms[k].median
            if b > 0:
                r[f"{k}_ratio"] = a / b
        e = self.eager.tokens_per_s.median
        if e > 0:
            r["decode_speedup"] = self.ours.tokens_per_s.median / e
        if self.eager.memory.peak_delta_mb > 0:
            r["peak_delta_ratio"] = self.ours.memory.peak_delta_mb / self.eager.memory.peak_delta_mb
        return r

    @property
    def agreement(self) -> dict[str, Any] | None:
        """Do the greedy tokens of both sides agree?"""
        if self.eager is None:
            return None
        a, b = self.ours.token_ids, self.eager.token_ids
        prefix = 0
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
        n = max(len(a), len(b))
        return {
            "first_token": bool(a and b and a[0] == b[0]),
            "common_prefix": prefix,
            "fraction": (sum(1 for x, y in zip(a, b) if x == y) / n) if n else 1.0,
            "identical": a == b,
        }

    def to_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "artifacts": self.artifacts,
            "backend": self.backend,
            "precision": self.precision,
            "recipe": self.recipe,
            "image": self.image,
            "image_size": self.image_size,
            "prompt": self.prompt,
            "new_tokens": self.new_tokens,
            "repeat": self.repeat,
            "warmup": self.warmup,
            "machine": self.machine,
            "ours": self.ours.to_dict(),
            "eager": self.eager.to_dict() if self.eager else None,
            "ratios": {k: round(v, 4) for k, v in ratios.items()} if ratios is not None else None,
            "agreement": self.agreement,
            "reference": self.reference,
            "seconds": round(self.seconds, 2),
        }


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set size (psutil, else /proc/self/statm; 0 where neither works)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssMonitor:
    """Peak RSS over a block: a daemon thread samples every `interval` s; the kernel's high-water mark,
    reset at the start, catches spikes between samples where the platform allows it."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssMonitor":
        self._hwm = _reset_hwm()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="mmexport-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _read_hwm())

    @property
    def method(self) -> str:
        return f"RSS sampled every {self.interval * 1e3:g} ms ({self.samples} samples)" + (" + VmHWM" if self._hwm else "")


# ---------------------------------------------------------------------------------------------
# inputs and machine
# ---------------------------------------------------------------------------------------------
def default_image(size: int = 448):
    """A deterministic size x size RGB picture: shapes on a gradient background."""
    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.stack([40 + xx * 150 // size, 90 + yy * 120 // size, 200 - (xx + yy) * 80 // (2 * size)], -1)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    s = size / 448
    d.ellipse([60 * s, 60 * s, 200 * s, 200 * s], fill=(230, 60, 50), outline=(20, 20, 20), width=max(1, int(4 * s)))
    d.rectangle([250 * s, 80 * s, 400 * s, 190 * s], fill=(250, 210, 40))
    d.polygon([(120 * s, 400 * s), (220 * s, 240 * s), (320 * s, 400 * s)], fill=(40, 160, 80))
    d.line([(20 * s, 430 * s), (430 * s, 230 * s)], fill=(255, 255, 255), width=max(1, int(6 * s)))
    for i in range(6):
        c = (330 * s + 18 * s * (i % 3), 260 * s + 18 * s * (i // 3))
        d.ellipse([c[0] - 6 * s, c[1] - 6 * s, c[0] + 6 * s, c[1] + 6 * s], fill=(20, 20, 120))
    return im


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(with_torch: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import psutil

        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_total_mb"] = round(psutil.virtual_memory().total / MB)
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    info["mmexport_threads"] = os.environ.get("MMEXPORT_THREADS") or "default"
    info["ort_spinning"] = ort_spinning()
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        try:
            import transformers

            info["transformers"] = transformers.__version__
        except ImportError:
            pass
    return info


# ---------------------------------------------------------------------------------------------
# the bench
# ---------------------------------------------------------------------------------------------
def _collect(runs: list[dict[str, float]]) -> dict[str, Stats]:
    """Stats per stage over the runs, for the stages (of STAGES) the runs report."""
    return {k: Stats([r[k] for r in runs]) for k in STAGES if k in runs[0]}


def bench(
    artifact_dir: Path | str,
    image: Path | str | None = None,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 64,
    repeat: int = 3,
    warmup: int = 1,
    backend: str = "ort",
    vs_pytorch: bool = False,
    model: str | None = None,
    interleave: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Benchmark the build in `artifact_dir` (and, with `vs_pytorch`, transformers' eager model).

    `interleave` (with `vs_pytorch`): both models stay loaded and the timed runs alternate, ours then
    eager, so a machine whose speed drifts (shared or thermally limited CPUs) slows both sides alike;
    each side's peak memory is then its RSS after its own loading and warm-up plus the largest rise
    during its runs. Without it, each side is loaded, run and released in turn."""
    from .runtime.image import load_image

    if new_tokens < 1:
        raise UserError(f"new_tokens must be at least 1, got {new_tokens}")
    if repeat < 1:
        raise UserError(f"repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise UserError(f"warmup must be 0 or more, got {warmup}")
    if vs_pytorch:
        require_torch()
    t_start = time.perf_counter()
    pil = load_image(image) if image is not None else default_image()
    image_desc = str(image) if image is not None else f"generated {pil.width}x{pil.height}"
    sides: list[_Side] = [_OursSide(artifact_dir, backend, [pil], prompt, new_tokens, warmup, repeat, log)]
    if vs_pytorch:
        sides.append(_EagerSide(sides[0], [pil], prompt, new_tokens, model, log))
    interleave = interleave and len(sides) > 1
    try:
        if interleave:
            for side in sides:
                side.load()
                side.warm(warmup)
            log(f"timed runs interleaved: {' / '.join(s.label for s in sides)}, {repeat} each")
            for i in range(repeat):
                for side in sides:
                    side.timed_run(i, repeat)
        for side in sides:
            if not interleave:
                side.load()
                side.warm(warmup)
                for i in range(repeat):
                    side.timed_run(i, repeat)
            side.close()
    finally:
        for side in sides:
            side.close()
    ours = sides[0]
    report = BenchReport(
        artifacts=str(artifact_dir), backend=backend, precision=ours.manifest.data.get("precision", ""),
        recipe=ours.manifest.data.get("recipe", {}).get("name", ""), image=image_desc,
        image_size=[pil.width, pil.height], prompt=prompt, new_tokens=new_tokens, repeat=repeat, warmup=warmup,
        machine=machine_info(with_torch=vs_pytorch), ours=ours.result(interleave),
    )
    report.machine["interleaved"] = interleave
    if vs_pytorch:
        report.eager, report.reference = sides[1].result(interleave), sides[1].reference
    report.seconds = time.perf_counter() - t_start
    return report


class _Side:
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
        return _collect(self.runs), Stats([r["tok_s"] for r in self.runs])

    def _prepare(self) -> None:
        """What comes before the baseline and the load timing (framework imports, finding the checkpoint)."""

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OursSide(_Side):
    label = "ours "

    def __init__(self, artifact_dir, backend: str, images, prompt: str, new_tokens: int, warmup: int, repeat: int, log):
        super().__init__(log)
        self.artifact_dir, self.backend, self.images, self.prompt, self.new_tokens = artifact_dir, backend, images, prompt, new_tokens
        self.warmup, self.repeat = warmup, repeat
        self.pipe = None
        self.manifest = None  # set by load(), which runs before the eager side's

    def _prepare(self) -> None:
        if self.backend == "ort":  # the baseline includes the framework's libraries, as torch's for the eager side
            import onnxruntime  # noqa: F401

    def _load(self) -> None:
        from .runtime.pipeline import Pipeline

        self.pipe = pipe = Pipeline(self.artifact_dir, backend=self.backend)
        self.manifest = pipe.manifest
        prep = pipe.prepare(self.prompt, self.images)
        if self.new_tokens > pipe.max_context - len(prep.input_ids):
            raise UserError(f"{len(prep.input_ids)} prompt tokens + {self.new_tokens} new tokens exceed this build's context of {pipe.max_context}")
        self.log(f"bench {self.artifact_dir} ({self.manifest.data.get('precision')}, {self.backend}): {len(prep.input_ids)} prompt tokens, "
                 f"{self.new_tokens} new tokens, {self.warmup} warm-up + {self.repeat} timed run(s)")

    def _run(self) -> dict[str, Any]:
        assert self.pipe is not None
        res = self.pipe.generate(self.prompt, self.images, max_new_tokens=self.new_tokens, ignore_eos=True)
        return {**{k: float(v) for k, v in res.timings_ms.items() if k in STAGES}, "tok_s": res.tokens_per_s, "res": res}

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


class _EagerSide(_Side):
    label = "eager"

    def __init__(self, ours: _OursSide, images, prompt: str, new_tokens: int, model: str | None, log):
        super().__init__(log)
        from .runtime.prompt import user_message

        self.ours, self.images, self.new_tokens, self.model = ours, images, new_tokens, model
        self.messages = user_message(prompt, len(images))
        self.tm = None
        self.reference: dict[str, Any] = {}
        self.memo = False
        self._stack = None

    def _prepare(self) -> None:
        import torch  # noqa: F401  (the baseline includes torch, as ours includes onnxruntime)

        from .models.base import reference_checkpoint

        m = self.ours.manifest
        assert m is not None, "the exported side is loaded first"
        self.runner = _EAGER.get(m.family)
        if self.runner is None:
            raise UserError(f"--vs-pytorch: no eager benchmark for family {m.family!r}")
        _recipe, self.adapter, self.model_dir, same = reference_checkpoint(m.data, self.model, log=self.log)
        self.reference = {"checkpoint": str(self.model_dir), "same_as_build": same}
        if not same:
            self.log(f"warning: {self.model_dir} is not the checkpoint this build was exported from")

    def _load(self) -> None:
        import contextlib

        import torch

        from .models.base import memoized_from_pretrained

        self.tm = self.adapter.load(self.model_dir)
        self.log(f"pytorch eager: {self.model_dir} (float32, attn eager, {torch.get_num_threads()} threads)")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())  # per thread: runs happen on this one
        self.memo = self._stack.enter_context(memoized_from_pretrained())
        self.adapter.reference_inputs(self.tm, self.model_dir, self.messages, self.images)  # loads the tokenizer / processor once

    def _run(self) -> dict[str, Any]:
        return self.runner(self.tm, self.adapter, self.model_dir, self.messages, self.images, self.new_tokens)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        if self.tm is not None:
            self.tm = None
            gc.collect()

    def result(self, interleaved: bool) -> SideResult:
        out = self.last
        timings, tok_s = self.stats()
        return SideResult(
            name="pytorch eager (fp32)",
            timings_ms=timings,
            tokens_per_s=tok_s,
            tokens_generated=len(out["tokens"]),
            prompt_tokens=out["prompt_tokens"],
            token_ids=out["tokens"],
            memory=self.memory(interleaved),
            load_s=self.load_s,
            notes=["preprocess: transformers tokenizer + image processor" + (" (loaded once, outside the timing)" if self.memo else " (including from_pretrained)"),
                   *out.get("notes", []),
                   "memory baseline: the RSS before this model was loaded, in the same process"
                   + (" (the exported model loaded too: the runs are interleaved)" if interleaved else " (the exported model already released)")],
        )


def _eager_qwen2_vl(model, adapter, model_dir, messages, images, new_tokens) -> dict[str, Any]:
    """One request through transformers' Qwen2-VL, stage by stage, greedy, EOS ignored."""
    merger_s = [0.0, 0.0]  # [start, accumulated]

    def pre(_mod, _inp):
        merger_s[0] = time.perf_counter()

    def post(_mod, _inp, _out):
        merger_s[1] += time.perf_counter() - merger_s[0]

    merger = model.model.visual.merger
    hooks = [merger.register_forward_pre_hook(pre), merger.register_forward_hook(post)]
    try:
        t0 = time.perf_counter()
        inputs = adapter.reference_inputs(model, model_dir, messages, images)
        t1 = time.perf_counter()
        mm = None
        if "pixel_values" in inputs:
            mm = {"image": model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)}
        t2 = time.perf_counter()
        model.model.rope_deltas = None  # a fresh request
        kw = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in inputs}
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs=mm,
                    use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[0, -1]
        t3 = time.perf_counter()
        tokens = _eager_decode(model, logits, out.past_key_values, new_tokens)
        t4 = time.perf_counter()
    finally:
        for h in hooks:
            h.remove()
    return _eager_stages((t0, t1, t2, t3, t4), merger_s[1], tokens, inputs,
                         "vision excludes the merger, which is timed as projector (forward hooks)")


def _eager_decode(model, logits, cache, new_tokens: int, **step_kw) -> list[int]:
    """Greedy decode with transformers' KV cache, one token per forward, EOS ignored."""
    import torch

    tokens: list[int] = []
    while True:
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if len(tokens) == new_tokens:
            return tokens
        out = model(input_ids=torch.tensor([[tok]], dtype=torch.long), past_key_values=cache, use_cache=True, logits_to_keep=1, **step_kw)
        cache = out.past_key_values
        logits = out.logits[0, -1]


def _eager_stages(t: tuple[float, ...], proj: float, tokens: list[int], inputs, note: str) -> dict[str, Any]:
    """The eager side's stage times from its clock readings (start, preprocessed, vision done, first
    token, last token) and the projector's share of the vision time."""
    t0, t1, t2, t3, t4 = t
    decode = t4 - t3
    return {
        "preprocess": (t1 - t0) * 1e3,
        "vision": (t2 - t1 - proj) * 1e3,
        "projector": proj * 1e3,
        "prefill": (t3 - t2) * 1e3,
        "ttft": (t3 - t0) * 1e3,
        "decode": decode * 1e3,
        "total": (t4 - t0) * 1e3,
        "tok_s": (len(tokens) - 1) / decode if len(tokens) > 1 and decode > 0 else 0.0,
        "tokens": tokens,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "notes": [note],
    }


def _eager_mllama(model, adapter, model_dir, messages, images, new_tokens) -> dict[str, Any]:
    """One request through transformers' mllama, stage by stage, greedy, EOS ignored. transformers
    projects the cross-attention keys/values inside its first forward, so they count as prefill here."""
    t0 = time.perf_counter()
    inputs = adapter.reference_inputs(model, model_dir, messages, images)
    t1 = time.perf_counter()
    states, proj, mask = None, 0.0, inputs.get("cross_attention_mask")
    if "pixel_values" in inputs:
        feats = model.model.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                         aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        tp = time.perf_counter()
        states = model.model.multi_modal_projector(feats)
        states = states.reshape(-1, states.shape[-2], states.shape[-1])
        proj = time.perf_counter() - tp
    t2 = time.perf_counter()
    out = model(input_ids=inputs["input_ids"], cross_attention_states=states, cross_attention_mask=mask, use_cache=True, logits_to_keep=1)
    logits = out.logits[0, -1]
    t3 = time.perf_counter()
    step_mask = mask[:, -1:] if mask is not None else None  # a generated token sees what the last prompt token sees
    tokens = _eager_decode(model, logits, out.past_key_values, new_tokens, cross_attention_mask=step_mask)
    t4 = time.perf_counter()
    return _eager_stages((t0, t1, t2, t3, t4), proj, tokens, inputs,
                         "cross-attention keys/values are projected inside prefill (transformers caches them in its first forward)")


_EAGER: dict[str, Callable[..., dict[str, Any]]] = {"qwen2_vl": _eager_qwen2_vl, "mllama": _eager_mllama}


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _fmt_ms(s: Stats) -> str:
    return f"{s.median:,.1f}" + (f" [dim]({s.min:,.1f}-{s.max:,.1f})[/dim]" if len(s.samples) > 1 else "")


def render_bench(report: BenchReport, console) -> None:
    from rich.table import Table

    o, e = report.ours, report.eager
    r = report.ratios or {}
    title = (f"bench {report.artifacts} ({report.precision}, {report.backend}): {report.image}, "
             f"{o.prompt_tokens} prompt tokens, {report.new_tokens} new tokens, median of {report.repeat}")
    cols = ["stage", f"{o.name} ms"] + ([f"{e.name} ms", "ours / eager"] if e else [])
    t = Table(*cols, title=title)
    for k in STAGES:
        if k not in o.timings_ms:
            continue
        row = [k, _fmt_ms(o.timings_ms[k])]
        if e:
            row += [_fmt_ms(e.timings_ms[k]) if k in e.timings_ms else "-", f"{r[k + '_ratio']:.2f}x" if k + "_ratio" in r else "-"]
        t.add_row(*row, style="bold" if k == "ttft" else None)
    row = ["decode tok/s", _fmt_ms(o.tokens_per_s)]
    if e:
        row += [_fmt_ms(e.tokens_per_s), f"{r['decode_speedup']:.2f}x speed-up" if "decode_speedup" in r else "-"]
    t.add_row(*row, style="bold")
    row = ["tokens generated", str(o.tokens_generated)] + ([str(e.tokens_generated), ""] if e else [])
    t.add_row(*row)
    row = ["load s", f"{o.load_s:.2f}"] + ([f"{e.load_s:.2f}", ""] if e else [])
    t.add_row(*row)
    console.print(t)
    if o.calls:
        console.print("component calls per request: " + ", ".join(f"{k} {v}" for k, v in o.calls.items()), highlight=False)

    mt = Table("memory (MB)", o.name, *([e.name] if e else []))
    for label, f in (("before load", "baseline_mb"), ("after load", "loaded_mb"), ("peak (timed runs)", "peak_mb"), ("peak - before load", "peak_delta_mb")):
        mt.add_row(label, f"{getattr(o.memory, f):,.0f}", *([f"{getattr(e.memory, f):,.0f}"] if e else []))
    console.print(mt)
    if e:
        a = report.agreement or {}
        console.print(f"greedy tokens: first token {'agrees' if a.get('first_token') else 'DIFFERS'}, "
                      f"{a.get('common_prefix', 0)}/{report.new_tokens} identical prefix, {a.get('fraction', 0):.0%} agree", highlight=False)
        if report.reference and not report.reference.get("same_as_build"):
            console.print("[yellow]warning: the eager checkpoint is not the one this build was exported from[/yellow]")
    mi = report.machine
    console.print(f"[dim]{mi.get('cpu')} x{mi.get('cpu_count')}, {mi.get('platform')}, onnxruntime {mi.get('onnxruntime')}"
                  + (f", torch {mi.get('torch')} ({mi.get('torch_threads')} threads)" if "torch" in mi else "")
                  + f"; memory: {o.memory.method}[/dim]", highlight=False)


def require_matplotlib() -> None:
    """Raise UserError unless matplotlib can be imported (the CLI calls this before a long bench)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None


def require_torch() -> None:
    """Raise UserError unless torch and transformers are installed (without importing them)."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--vs-pytorch needs {' and '.join(missing)} (pip install -e '.[export]')")


def plot_bench(report: BenchReport, path: Path | str) -> Path:
    """A PNG: TTFT split (stacked), decode tokens/s and peak memory, ours vs eager."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    sides = [report.ours] + ([report.eager] if report.eager else [])
    names = [s.name for s in sides]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    left = [0.0] * len(sides)
    colors = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "projector": "#17becf", "cross_kv": "#9467bd", "prefill": "#ff7f0e"}
    for k, c in colors.items():
        if not any(k in s.timings_ms for s in sides):
            continue
        vals = [s.timings_ms[k].median if k in s.timings_ms else 0.0 for s in sides]
        ax.barh(names, vals, left=left, color=c, label=k)
        left = [a + b for a, b in zip(left, vals)]
    for i, s in enumerate(sides):
        ax.text(left[i], i, f" {s.timings_ms['ttft'].median:,.0f} ms", va="center")
    ax.set_xlabel("time to first token (ms, median)")
    ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    labels = [n.split(" (")[0] for n in names]
    _bar_panel(axes[1], labels, [s.tokens_per_s.median for s in sides], "decode tokens/s (median)", "{:.1f}")
    _bar_panel(axes[2], labels, [s.memory.peak_delta_mb for s in sides], "peak RSS over baseline (MB)", "{:,.0f}")
    mi = report.machine
    fig.suptitle(f"{report.recipe or report.artifacts} ({report.precision}, {report.backend}): {report.ours.prompt_tokens} prompt tokens, "
                 f"{report.new_tokens} new tokens; {mi.get('cpu_count')} CPUs, onnxruntime {mi.get('onnxruntime')}"
                 + (f", torch {mi['torch']}" if "torch" in mi else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def _bar_panel(ax, labels: list[str], vals: list[float], ylabel: str, fmt: str) -> None:
    """One bar per side (ours green, eager red), each labelled with its value."""
    ax.bar(range(len(vals)), vals, color=["#2ca02c", "#d62728"][: len(vals)])
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(vals):
        ax.text(i, v, fmt.format(v), ha="center", va="bottom")
    ax.set_ylim(0, max(vals) * 1.15 if max(vals) > 0 else 1)
