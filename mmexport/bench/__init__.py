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
the same process (interleaved with ours, or after the exported model has been released):
- preprocess: transformers' tokenizer + image processor (the adapter's `reference_inputs`; their
  `from_pretrained` loading is done once, as the runtime loads its tokenizer once);
- then transformers' own greedy `generate` for exactly `new_tokens` tokens (EOS not stopping it), with
  forward hooks on the modules the family names as its vision and projector stages
  (`eager_stage_modules`) and a logits processor that notes when each step's logits are ready: vision
  and projector are the hooked modules' time, prefill the rest until the first logits, decode the time
  from the first to the last logits. No family code: the same for every family.
Ratios are ours / eager for times, ours / eager for tokens per second (the decode speed-up).

The exported side never imports torch; torch is imported only for `vs_pytorch`.

Layout: results.py (report objects), memory.py (RSS), machine.py (machine facts, default image),
sides.py (a side's load / warm-up / timed runs; the exported model), eager.py (transformers eager),
render.py (table and plot); `bench()` below runs them, `bench_builds()` compares builds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .machine import default_image, machine_info
from .eager import require_torch
from .render import plot_bench, render_bench, render_builds, require_matplotlib
from .results import STAGES, BenchReport, SideResult, Stats, describe_quantization
from .sides import OursSide, Side

DEFAULT_PROMPT = "Describe the image."

__all__ = ["STAGES", "DEFAULT_PROMPT", "BenchReport", "SideResult", "Stats", "bench", "bench_builds", "default_image", "plot_bench",
           "render_bench", "render_builds", "require_matplotlib", "require_torch"]


def _check(new_tokens: int, repeat: int, warmup: int) -> None:
    if new_tokens < 1:
        raise UserError(f"new_tokens must be at least 1, got {new_tokens}")
    if repeat < 1:
        raise UserError(f"repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise UserError(f"warmup must be 0 or more, got {warmup}")


def _time_sides(sides: list[Side], repeat: int, warmup: int, interleave: bool, limits: bool, log: Callable[[str], None]) -> list:
    """Load, warm up and time every side: interleaved (all loaded, run i of each side in turn, then run i + 1) or
    one side after the other, each released before the next loads. Returns the limits of each exported side
    (OursSide), in order, sampled beside its own timed runs; [] without `limits`."""
    ours = [s for s in sides if isinstance(s, OursSide)]
    try:
        if interleave:
            for side in sides:
                side.load()
                side.warm(warmup)
            log(f"timed runs interleaved: {' / '.join(s.label.strip() for s in sides)}, {repeat} each")
            for i in range(repeat):
                for side in sides:
                    side.timed_run(i, repeat)
        for side in sides:
            if not interleave:
                side.load()
                side.warm(warmup)
                for i in range(repeat):
                    side.timed_run(i, repeat)
            if limits and side in ours:
                side.note_rows()
            side.close()
        return [o.measure_limits() for o in ours] if limits else []
    finally:
        for side in sides:
            side.close()
        for o in ours:
            o.close_probes()


def _report(ours: OursSide, artifact_dir, image_desc: str, pil, prompt: str, new_tokens: int, repeat: int, warmup: int,
            interleave: bool, with_torch: bool) -> BenchReport:
    report = BenchReport(
        artifacts=str(artifact_dir), backend=ours.backend, precision=ours.manifest.data.get("precision", ""),
        recipe=ours.manifest.data.get("recipe", {}).get("name", ""), image=image_desc,
        image_size=[pil.width, pil.height], prompt=prompt, new_tokens=new_tokens, repeat=repeat, warmup=warmup,
        machine=machine_info(with_torch=with_torch), ours=ours.result(interleave),
    )
    report.machine["interleaved"] = interleave
    report.quantization = describe_quantization(ours.manifest.data.get("quantization"))
    return report


def _image(image):
    from ..runtime.image import load_image

    pil = load_image(image) if image is not None else default_image()
    return pil, (str(image) if image is not None else f"generated {pil.width}x{pil.height}")


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
    limits: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Benchmark the build in `artifact_dir` (and, with `vs_pytorch`, transformers' eager model).

    `interleave` (with `vs_pytorch`): both models stay loaded and the timed runs alternate, ours then
    eager, so a machine whose speed drifts (shared or thermally limited CPUs) slows both sides alike;
    each side's peak memory is then its RSS after its own loading and warm-up plus the largest rise
    during its runs. Without it, each side is loaded, run and released in turn."""
    _check(new_tokens, repeat, warmup)
    if vs_pytorch:
        require_torch()
    t_start = time.perf_counter()
    pil, image_desc = _image(image)
    ours = OursSide(artifact_dir, backend, [pil], prompt, new_tokens, warmup, repeat, log, probe=limits)
    sides: list[Side] = [ours]
    if vs_pytorch:
        from .eager import EagerSide

        sides.append(EagerSide(ours, [pil], prompt, new_tokens, model, log))
    interleave = interleave and len(sides) > 1
    measured = _time_sides(sides, repeat, warmup, interleave, limits, log)
    report = _report(ours, artifact_dir, image_desc, pil, prompt, new_tokens, repeat, warmup, interleave, vs_pytorch)
    report.limits = measured[0] if measured else None
    if vs_pytorch:
        report.eager, report.reference = sides[1].result(interleave), sides[1].reference
    report.seconds = time.perf_counter() - t_start
    return report


def bench_builds(artifact_dirs: list[Path | str], image: Path | str | None = None, prompt: str = DEFAULT_PROMPT,
                 new_tokens: int = 64, repeat: int = 3, warmup: int = 1, backend: str = "ort", limits: bool = True,
                 log: Callable[[str], None] = print) -> list[BenchReport]:
    """Compare builds (precisions, block sizes, before and after a change) on the same request: all stay loaded
    and their timed runs alternate (run i of each build, in the order given, then run i + 1), so a machine whose
    speed drifts slows them alike. One report per build, each with its own limits (sampled after its own runs);
    memory as for interleaved sides (`Side.memory`). The same directory may be given twice: the spread of an A/A
    comparison is this machine's noise."""
    if len(artifact_dirs) < 2:
        raise UserError("comparing builds needs two artifact directories or more")
    _check(new_tokens, repeat, warmup)
    t_start = time.perf_counter()
    pil, image_desc = _image(image)
    sides = [OursSide(d, backend, [pil], prompt, new_tokens, warmup, repeat, log, probe=limits, label=f"build {i + 1}")
             for i, d in enumerate(artifact_dirs)]
    measured = _time_sides(list(sides), repeat, warmup, True, limits, log)
    seconds = time.perf_counter() - t_start
    reports = []
    for i, (side, d) in enumerate(zip(sides, artifact_dirs)):
        r = _report(side, d, image_desc, pil, prompt, new_tokens, repeat, warmup, True, False)
        r.limits = measured[i] if measured else None
        r.seconds = seconds
        reports.append(r)
    return reports
