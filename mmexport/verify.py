"""`mmexport verify`: does the exported model answer like the PyTorch original?

The same real inputs (images at sizes other than the traced ones, several images in one prompt, and a
text-only prompt) go through transformers and through the exported graphs:

- inputs: prompt token ids, preprocessed pixels and M-RoPE positions from the torch-free runtime
  against transformers' tokenizer, image processor and get_rope_index;
- per component, each fed the reference's own input (so errors do not compound): max abs error,
  max rel error, cosine similarity, NaN/Inf (the family adapter's `verify_components` knows which);
- end to end through the runtime pipeline: first-token logits error, and N greedy tokens against
  transformers' `generate`.

Results are objects; the CLI renders them as a table or JSON and exits 1 when they fail the recipe's
tolerances for the build's precision.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np



@dataclass
class Comparison:
    case: str
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    finite: bool
    tol_abs: float
    tol_cos: float
    shape: list[int]

    @property
    def passed(self) -> bool:
        return self.finite and self.max_abs <= self.tol_abs and self.cosine >= self.tol_cos

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class Check:
    """An exact check (ids, positions) or the end-to-end token comparison."""

    case: str
    name: str
    passed: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    artifacts: str
    precision: str
    backend: str
    tolerance: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    task: Any = None  # taskeval.TaskResult when a task was evaluated
    seconds: float = 0.0
    not_recorded: str | None = None  # why DIR/verify.json could not be written (read-only directory, full disk)

    @property
    def failures(self) -> list[str]:
        f = [f"{c.case}/{c.name}: max_abs {c.max_abs:.3g} (tol {c.tol_abs:g}), cosine {c.cosine:.6f}" + ("" if c.finite else ", NaN/Inf")
             for c in self.comparisons if not c.passed]
        f += [f"{c.case}/{c.name}: {c.detail}" for c in self.checks if not c.passed]
        return f + (self.task.failures if self.task is not None else [])

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifacts": self.artifacts,
            "precision": self.precision,
            "backend": self.backend,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "checks": [c.to_dict() for c in self.checks],
            "task": self.task.to_dict() if self.task is not None else None,
            "failures": self.failures,
            "seconds": round(self.seconds, 2),
        }


def component_tol(t) -> tuple[float, float]:
    """(max abs, min cosine) a component's output must meet under tolerance `t`."""
    return t.component_max_abs, t.component_min_cosine


def compare(case: str, name: str, got: np.ndarray, ref: np.ndarray, tol_abs: float, tol_cos: float) -> Comparison:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Comparison(case, name, float("inf"), float("inf"), -1.0, False, tol_abs, tol_cos, list(got.shape))
    finite = bool(np.isfinite(got).all())
    diff = np.abs(got - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / (np.abs(ref) + 1e-6)).max()) if diff.size else 0.0
    denom = float(np.linalg.norm(got) * np.linalg.norm(ref))
    cosine = float(np.dot(got.ravel(), ref.ravel()) / denom) if denom > 0 else float(np.array_equal(got, ref))
    return Comparison(case, name, max_abs, max_rel, cosine, finite, tol_abs, tol_cos, list(got.shape))


def default_images() -> list[Any]:
    """Three deterministic images of different odd sizes (and not the traced 6x10-patch grid)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    # portrait, wide strip, landscape: different patch grids (Method A) and tile layouts (Method B)
    for h, w in ((123, 77), (40, 150), (180, 260)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], -1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def verify(
    artifacts: Path,
    model: str | None = None,
    images: list[Path] | None = None,
    prompt: str | None = None,
    tokens: int | None = None,
    backend: str = "ort",
    task: str | None = "auto",
    task_examples: int | None = None,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """`task`: "auto" evaluates the recipe's [task] (if it declares one), "none" skips it, or a task name."""
    from .artifact.files import atomic_write
    from .checkpoints import reference_checkpoint
    from .export.preflight import check_checkpoint_files
    from .runtime.image import load_image
    from .export.build import VISION_STAGES, vision_gate
    from .taskeval import TaskGate, evaluate_task, load_task
    from .runtime.pipeline import KVCache, Pipeline
    from .runtime.prompt import user_message
    from .runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    pipe = Pipeline(artifacts, backend=backend, rehash=True)  # verify reads every file, whatever .verified.json says
    m = pipe.manifest
    recipe, adapter, model_dir, same_weights = reference_checkpoint(m.data, model, log=log)
    check_checkpoint_files(model_dir, adapter.check_checkpoint)  # a broken reference is one line, before loading it
    quant = m.data.get("quantization")
    scheme = quant["scheme"] if quant else m.data["precision"]
    tol = recipe.tolerance(scheme)  # end to end, and for quantized components
    base_tol = recipe.tolerance(m.data["precision"])
    quantized = set(quant["components"]) if quant else set()

    def tol_for(component: str):
        if component in quantized and component in VISION_STAGES:  # a quantized vision tower has its own gate
            return recipe.tolerance(vision_gate(quant.get("vision_scheme") or scheme))
        return tol if component in quantized else base_tol

    gate = TaskGate.from_recipe(recipe.task, task)
    if gate is not None:
        load_task(gate.name)  # an unknown task fails now, not after the comparisons
        if task_examples:
            gate = replace(gate, examples=task_examples)
    n_tokens = tokens or tol.greedy_tokens
    log(f"reference: transformers on {model_dir}")
    torch_model = adapter.load(model_dir)

    report = VerifyReport(str(artifacts), m.data["precision"] + (f"+{scheme}" if quant else ""), backend, asdict(tol))
    report.checks.append(Check("build", "source weights", same_weights,
                               "same checkpoint as the build" if same_weights
                               else "the reference checkpoint is not the one this build was exported from"))

    pil_images = [load_image(p) for p in images] if images else default_images()
    text = prompt or "Describe the images in detail."
    cases = [("images", text, pil_images[: pipe.max_images]), ("text-only", "Write one sentence about the sea.", [])]
    for case, case_prompt, case_images in cases:
        log(f"case {case}: {len(case_images)} image(s)")
        ref_in = adapter.reference_inputs(torch_model, model_dir, user_message(case_prompt, len(case_images)), case_images)
        ref = adapter.reference_outputs(torch_model, ref_in)
        prep = pipe.prepare(case_prompt, case_images)

        same_ids = np.array_equal(prep.input_ids, ref["input_ids"])
        report.checks.append(Check(case, "prompt tokens", same_ids, f"{len(prep.input_ids)} tokens, "
                                   + ("identical to transformers" if same_ids else f"transformers has {len(ref['input_ids'])}")))
        if not same_ids:
            continue
        if "position_ids" in ref:
            same_pos = np.array_equal(prep.position_ids, ref["position_ids"])
            report.checks.append(Check(case, "position ids", same_pos, "identical to transformers" if same_pos else "differ from transformers"))

        # each component on the reference's own inputs (the family knows its components)
        for r in adapter.verify_components(pipe, prep, ref, case, tol_for):
            (report.comparisons if isinstance(r, Comparison) else report.checks).append(r)

        # end to end: the runtime's own chain
        e2e = pipe.prefill(prep, pipe.encode_images(prep.images), KVCache(pipe.specs["decoder"]))
        report.comparisons.append(compare(case, "first-token logits", e2e, ref["logits"], tol.logits_max_abs, tol.component_min_cosine))

        ref_tokens = adapter.reference_generate(torch_model, ref_in, n_tokens)
        ours = pipe.generate(case_prompt, case_images, max_new_tokens=n_tokens, sampling=SamplingParams()).token_ids
        # transformers keeps the EOS it stopped on; the runtime stops before it
        ref_cmp = [t for t in ref_tokens if t not in pipe.eos_ids] if len(ref_tokens) > len(ours) else ref_tokens
        agree = _agreement(ours, ref_cmp)
        ok = agree >= tol.min_token_agreement and (tol.min_token_agreement < 1.0 or ours == ref_cmp)
        report.checks.append(Check(case, f"greedy {n_tokens} tokens", ok,
                                   f"{agree:.0%} agree" + (" (identical)" if ours == ref_cmp else ""),
                                   {"ours": ours, "transformers": ref_cmp}))
    if gate is not None:
        report.task = evaluate_task(pipe, torch_model, adapter, model_dir, gate, recipe.limits.max_new_tokens, log=log)
    pipe.close()
    report.seconds = time.perf_counter() - t0
    record = Path(artifacts) / "verify.json"
    try:  # exclusive temporary file + rename: never written through a symbolic link
        atomic_write(record, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as e:  # the result still counts and is printed; the CLI says it was not recorded
        report.not_recorded = f"{record} not written ({e.strerror or e}); the result above was not recorded"
    return report


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the reference's positions where the tokens agree (both sequences greedy)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b) if x == y) / n


def render_report(report: VerifyReport, console) -> None:
    from rich.table import Table

    t = Table("case", "stage", "max abs", "max rel", "cosine", "finite", "tol abs", "", title=f"verify {report.artifacts} ({report.precision}, {report.backend})")
    for c in report.comparisons:
        t.add_row(c.case, c.name, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.cosine:.7f}", "yes" if c.finite else "NO",
                  f"{c.tol_abs:g}", "[green]ok[/green]" if c.passed else "[red]FAIL[/red]")
    console.print(t)
    t2 = Table("case", "check", "result", "")
    for c in report.checks:
        t2.add_row(c.case, c.name, c.detail, "[green]ok[/green]" if c.passed else "[red]FAIL[/red]")
    console.print(t2)
    if report.task is not None:
        from .taskeval import render_task

        render_task(report.task, console, f"export ({report.precision})")
    console.print("[bold green]PASSED[/bold green]" if report.passed else "[bold red]FAILED[/bold red]", f"({report.seconds:.1f} s)")
