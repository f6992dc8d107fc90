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
render.py (table and plot); `bench()` below runs them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .machine import default_image, machine_info
from .eager import require_torch
from .render import plot_bench, render_bench, require_matplotlib
from .results import STAGES, BenchReport, SideResult, Stats
from .sides import OursSide, Side

DEFAULT_PROMPT = "Describe the image."

__all__ = ["STAGES", "DEFAULT_PROMPT", "BenchReport", "SideResult", "Stats", "bench", "default_image", "plot_bench",
           "render_bench", "require_matplotlib", "require_torch"]


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
    from ..runtime.image import load_image

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
    ours = OursSide(artifact_dir, backend, [pil], prompt, new_tokens, warmup, repeat, log, probe=limits)
    sides: list[Side] = [ours]
    if vs_pytorch:
        from .eager import EagerSide

        sides.append(EagerSide(ours, [pil], prompt, new_tokens, model, log))
    interleave = interleave and len(sides) > 1
    measured = None
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
            if limits and side is ours:
                side.note_rows()
            side.close()
        if limits:
            measured = ours.measure_limits()
    finally:
        for side in sides:
            side.close()
        ours.close_probes()
    report = BenchReport(
        artifacts=str(artifact_dir), backend=backend, precision=ours.manifest.data.get("precision", ""),
        recipe=ours.manifest.data.get("recipe", {}).get("name", ""), image=image_desc,
        image_size=[pil.width, pil.height], prompt=prompt, new_tokens=new_tokens, repeat=repeat, warmup=warmup,
        machine=machine_info(with_torch=vs_pytorch), ours=ours.result(interleave),
    )
    report.machine["interleaved"] = interleave
    report.limits = measured
    if vs_pytorch:
        report.eager, report.reference = sides[1].result(interleave), sides[1].reference
    report.seconds = time.perf_counter() - t_start
    return report

