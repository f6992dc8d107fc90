"""Task accuracy for `mmexport verify --task NAME`: the exported model and the PyTorch original answer
the same held-out task examples; each is scored, and the export may lose at most the recipe's
`max_accuracy_drop` against PyTorch (which itself must reach `min_accuracy`).

A task is a torch-free module under mmexport/tasks/ with `examples(seed, n)`, `EVAL_SEED`,
`is_correct(prediction, answer)` and `normalize(answer)`; the recipe's `[task]` table is its gate:

    [task]
    name = "shapes"
    examples = 200
    min_accuracy = 0.95
    max_accuracy_drop = 0.01
"""
from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .errors import UserError

TASKS = {"shapes": "mmexport.tasks.shapes"}


@dataclass(frozen=True)
class TaskGate:
    name: str
    examples: int = 200
    min_accuracy: float = 0.0
    max_accuracy_drop: float = 0.01

    @classmethod
    def from_recipe(cls, table: dict[str, Any] | None, name: str | None) -> "TaskGate | None":
        """The gate for `name` ("auto": the recipe's own task, "none": no task)."""
        if name == "none" or (name in (None, "auto") and not table):
            return None
        if name in (None, "auto"):
            name = table["name"]
        if table and table.get("name") == name:
            return cls(name, int(table.get("examples", 200)), float(table.get("min_accuracy", 0.0)), float(table.get("max_accuracy_drop", 0.01)))
        return cls(name)  # a task the recipe does not declare: reported, gated only on the drop


def load_task(name: str):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])


@dataclass
class TaskResult:
    task: str
    examples: int
    accuracy: float  # the exported model
    reference_accuracy: float  # PyTorch
    agreement: float  # same normalized answer as PyTorch
    per_kind: dict[str, dict[str, float]]
    gate: dict[str, Any]
    mistakes: list[dict[str, str]] = field(default_factory=list)  # a few, for the reader
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        f = []
        if self.reference_accuracy < self.gate["min_accuracy"]:
            f.append(f"task {self.task}: PyTorch accuracy {self.reference_accuracy:.1%} is below the recipe's {self.gate['min_accuracy']:.0%}")
        drop = self.reference_accuracy - self.accuracy
        if drop > self.gate["max_accuracy_drop"] + 1e-9:
            f.append(f"task {self.task}: accuracy {self.accuracy:.1%} vs PyTorch {self.reference_accuracy:.1%} "
                     f"(loses {drop * 100:.1f} points; at most {self.gate['max_accuracy_drop'] * 100:.1f} allowed)")
        return f

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": not self.failures, "failures": self.failures}


def evaluate_task(pipe, torch_model, adapter, model_dir, gate: TaskGate, max_new_tokens: int,
                  log: Callable[[str], None] = print) -> TaskResult:
    """Both sides answer `gate.examples` held-out examples greedily; answers are scored by the task."""
    from .checkpoints import memoized_from_pretrained
    from .runtime.prompt import user_message

    task = load_task(gate.name)
    t0 = time.perf_counter()
    exs = task.examples(task.EVAL_SEED, gate.examples)
    log(f"task {gate.name}: {len(exs)} held-out examples through the export and through PyTorch")
    kinds: dict[str, list[int]] = {}  # kind -> [n, ours correct, reference correct]
    agree = ours_ok = ref_ok = 0
    mistakes = []
    with memoized_from_pretrained():
        for i, ex in enumerate(exs):
            ours = pipe.generate(ex.question, [ex.image], max_new_tokens=max_new_tokens).text
            ref_in = adapter.reference_inputs(torch_model, model_dir, user_message(ex.question, 1), [ex.image])
            ref_ids = adapter.reference_generate(torch_model, ref_in, max_new_tokens)
            ref = pipe.prompts.decode([t for t in ref_ids if t not in pipe.eos_ids])
            a, b = task.is_correct(ours, ex.answer), task.is_correct(ref, ex.answer)
            k = kinds.setdefault(ex.kind, [0, 0, 0])
            k[0] += 1
            k[1] += a
            k[2] += b
            ours_ok += a
            ref_ok += b
            agree += task.normalize(ours) == task.normalize(ref)
            if (not a or not b) and len(mistakes) < 8:
                mistakes.append({"question": ex.question, "answer": ex.answer, "ours": ours, "pytorch": ref})
            if (i + 1) % 50 == 0:
                log(f"  {i + 1}/{len(exs)}: accuracy {ours_ok / (i + 1):.1%} (PyTorch {ref_ok / (i + 1):.1%})")
    n = max(len(exs), 1)
    return TaskResult(
        task=gate.name,
        examples=len(exs),
        accuracy=ours_ok / n,
        reference_accuracy=ref_ok / n,
        agreement=agree / n,
        per_kind={k: {"examples": v[0], "accuracy": v[1] / v[0], "reference_accuracy": v[2] / v[0]} for k, v in sorted(kinds.items())},
        gate=asdict(gate),
        mistakes=mistakes,
        seconds=time.perf_counter() - t0,
    )


def render_task(result: TaskResult, console, label: str) -> None:
    from rich.table import Table

    t = Table("question kind", "examples", f"{label}", "PyTorch", title=f"task {result.task}: {result.examples} held-out examples")
    for k, v in result.per_kind.items():
        t.add_row(k, str(v["examples"]), f"{v['accuracy']:.1%}", f"{v['reference_accuracy']:.1%}")
    t.add_row("all", str(result.examples), f"{result.accuracy:.1%}", f"{result.reference_accuracy:.1%}", style="bold")
    console.print(t)
    g = result.gate
    console.print(f"answers identical to PyTorch: {result.agreement:.1%}; gate: PyTorch >= {g['min_accuracy']:.0%}, "
                  f"loss <= {g['max_accuracy_drop'] * 100:.1f} points: " + ("[green]ok[/green]" if not result.failures else "[red]FAIL[/red]"),
                  highlight=False)
