"""The task-accuracy gate of `mmexport verify --task` (mmexport/taskeval.py) and the recipe's [task] table."""
from __future__ import annotations

import pytest

from mmexport.errors import UserError
from mmexport.recipes import parse_recipe
from mmexport.taskeval import TaskGate, TaskResult, load_task

TABLE = {"name": "shapes", "examples": 40, "min_accuracy": 0.95, "max_accuracy_drop": 0.01}


def _result(ours: float, ref: float) -> TaskResult:
    return TaskResult("shapes", 200, ours, ref, 0.99, {}, gate=TaskGate(**TABLE).__dict__)


def test_gate_selection():
    assert TaskGate.from_recipe(TABLE, "auto") == TaskGate("shapes", 40, 0.95, 0.01)
    assert TaskGate.from_recipe(TABLE, "none") is None
    assert TaskGate.from_recipe(None, "auto") is None  # nothing declared: no task by default
    undeclared = TaskGate.from_recipe(None, "shapes")  # asked for explicitly: reported, gated on the drop only
    assert undeclared.min_accuracy == 0.0 and undeclared.max_accuracy_drop == 0.01


@pytest.mark.parametrize("ours, ref, ok", [(0.99, 0.995, True), (0.985, 0.995, True), (0.98, 0.995, False), (0.97, 0.94, False), (1.0, 1.0, True)])
def test_gate_decides(ours, ref, ok):
    r = _result(ours, ref)
    assert (not r.failures) is ok
    assert r.to_dict()["passed"] is ok


def test_failure_messages_name_the_numbers():
    f = _result(0.90, 0.99).failures
    assert len(f) == 1 and "90.0%" in f[0] and "9.0 points" in f[0]
    f = _result(0.90, 0.90).failures
    assert len(f) == 1 and "PyTorch accuracy 90.0%" in f[0]


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="unknown task"):
        load_task("nope")
    assert load_task("shapes").EVAL_SEED is not None


def test_recipe_task_table_is_validated():
    base = {"family": "qwen2_vl", "source": {"model": "x/y"}, "limits": {"max_images": 1, "max_context": 64, "max_new_tokens": 8},
            "tolerances": {"fp32": {"component_max_abs": 1e-4, "logits_max_abs": 1e-3}}}
    assert parse_recipe({**base, "task": TABLE}, "r").task == TABLE
    with pytest.raises(UserError, match=r"\[task\]"):
        parse_recipe({**base, "task": {"examples": 3}}, "r")
    with pytest.raises(UserError, match="unknown key"):
        parse_recipe({**base, "task": {"name": "shapes", "min_acc": 1}}, "r")
