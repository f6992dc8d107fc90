"""The trained tiny Qwen2-VL (checkpoints/qwen2-vl-shapes, recipe `qwen2-vl-shapes`): it answers what it sees.

The checkpoint is committed (scripts/train_shapes.py made it); these tests build it with mmexport and
judge every precision on held-out examples of the `shapes` task against transformers running the same
checkpoint, through `mmexport verify --task`.
"""
from __future__ import annotations

import json
import tomllib
import subprocess
import sys
from pathlib import Path

import pytest

from mmexport.doctor import cpu_info
from mmexport.tasks import shapes

from conftest import REPO, run_cli

CHECKPOINT = REPO / "checkpoints" / "qwen2-vl-shapes"
EXAMPLE = REPO / "examples" / "shapes.png"
TASK_EXAMPLES = "80"  # CI subset of the recipe's 200 (the full run is in README's figures)


@pytest.fixture(scope="session")
def shapes_artifacts(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "qwen2-vl-shapes"
    run_cli("build", "qwen2-vl-shapes", "--out", out)
    return out


def _example_question() -> tuple[str, str]:
    """The held-out example examples/shapes.png is: its question and answer, found by its pixels."""
    from PIL import Image

    digest = shapes.image_digest(Image.open(EXAMPLE))
    for ex in shapes.examples(shapes.EVAL_SEED, shapes.EVAL_EXAMPLES):
        if shapes.image_digest(ex.image) == digest:
            return ex.question, ex.answer
    raise AssertionError("examples/shapes.png is not one of the held-out examples")


def test_checkpoint_is_a_small_plain_qwen2_vl():
    files = [p for p in CHECKPOINT.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # weights as safetensors only
    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]


def test_readme_demo_answers_correctly(shapes_artifacts):
    """README's first command asks this question about examples/shapes.png; the export answers it right."""
    question, answer = _example_question()
    readme = (REPO / "README.md").read_text()
    first = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "mmexport build qwen2-vl-shapes" in first and "examples/shapes.png" in first and question in first
    out = run_cli("run", shapes_artifacts, "--image", EXAMPLE, "--prompt", question).stdout
    assert shapes.is_correct(out, answer), (question, answer, out)


def test_verify_task_fp32(shapes_artifacts, tmp_path):
    p = run_cli("verify", shapes_artifacts, "--task-examples", TASK_EXAMPLES, "--json")
    task = json.loads(p.stdout)["task"]
    assert task["passed"] and task["examples"] == int(TASK_EXAMPLES)
    assert task["reference_accuracy"] >= 0.95 and task["accuracy"] >= task["reference_accuracy"] - 0.01
    assert set(task["per_kind"]) == set(shapes.KINDS)


# Dynamic int8 of the vision tower and decoder: on the recipe's 200 held-out examples it answered 98.0 % against
# PyTorch's 98.5 % (one question in 80 flips, so the 80-example subset would not judge it fairly); its integer
# GEMM (u8s8) is exact with VNNI, and can saturate on CPUs without it, so it is judged where VNNI is present.
VNNI = pytest.mark.skipif(not {"avx512_vnni", "avx_vnni"} & set(cpu_info()["int8_dot_product"]),
                          reason="dynamic int8 is judged on a CPU with VNNI")
DYNAMIC = pytest.param(("--quantize", "int8", "--quant-method", "dynamic", "--quantize-vision"), id="int8-dynamic-with-vision", marks=VNNI)
# each component its best method: dynamic int8 for the vision tower's large GEMMs, block-wise int4 for the decode step
MIXED = pytest.param(("--quantize", "int4", "--quantize-vision", "--vision-quant-method", "dynamic"), id="int4-with-dynamic-int8-vision",
                     marks=VNNI)


# and the prompt through a second decoder graph of integer GEMMs (--prefill-quant-method), the decode steps block-wise int4
PREFILL = pytest.param(("--quantize", "int4", "--quantize-vision", "--vision-quant-method", "dynamic", "--prefill-quant-method", "dynamic"),
                       id="int4-with-dynamic-int8-prefill-and-vision", marks=VNNI)


@pytest.mark.parametrize("flags", [pytest.param(("--precision", "fp16"), id="fp16"), pytest.param(("--quantize", "int8"), id="int8"),
                                   pytest.param(("--quantize", "int4", "--quantize-vision"), id="int4-with-vision"), DYNAMIC, MIXED,
                                   PREFILL])
def test_verify_task_other_precisions(cache_dir, tmp_path, flags):
    out = tmp_path / "build"
    run_cli("build", "qwen2-vl-shapes", "--out", out, *flags)
    examples = "200" if "dynamic" in flags else TASK_EXAMPLES
    p = run_cli("verify", out, "--task-examples", examples, "--json")
    rep = json.loads(p.stdout)
    task = rep["task"]
    assert task["passed"] and task["accuracy"] >= task["reference_accuracy"] - 0.01, task
    if "--quantize-vision" in flags:  # the quantized tower is judged by its own gate, the decoder by the scheme's
        scheme = flags[1]
        vision_dynamic = "dynamic" in flags
        vscheme = "int8" if vision_dynamic else scheme
        recipe = tomllib.loads((REPO / "recipes" / "qwen2-vl-shapes.toml").read_text())["tolerances"]
        m = json.loads((out / "manifest.json").read_text())
        q = m["quantization"]
        assert {"decoder", "vision_encoder", "projector"} <= set(q["components"])
        assert q["method"] == ("dynamic" if "--quant-method" in flags else "blockwise")
        assert q["vision_method"] == ("dynamic" if vision_dynamic else "blockwise") and q["vision_scheme"] == vscheme
        assert q["components"]["vision_encoder"]["method"] == q["vision_method"]
        assert q["components"]["decoder"]["method"] == q["method"] and q["components"]["decoder"]["bits"] == q["bits"]
        by = {(c["case"], c["name"]): c for c in rep["comparisons"]}
        vis = by[("images[0]", "vision_encoder")]
        assert vis["tol_abs"] == recipe[f"{vscheme}_vision"]["component_max_abs"] and vis["max_abs"] > 1e-3
        assert by[("images", "decoder")]["tol_abs"] == recipe[scheme]["logits_max_abs"]  # its output is the logits
        prefill = m["components"]["decoder"].get("prefill")
        if "--prefill-quant-method" in flags:  # verify fed the decoder prompts: the int8 graph, judged by the scheme's gate
            assert q["prefill_method"] == "dynamic" and q["components"]["decoder_prefill"]["method"] == "dynamic"
            assert prefill["file"] == "onnx/decoder_prefill.onnx" and prefill["file"] in m["files"]
        else:
            assert prefill is None and not q.get("prefill_method")


def test_training_script_runs(tmp_path):
    """A few steps of every stage of scripts/train_shapes.py: the script stays runnable (the real run is
    minutes, see its docstring); what it writes is a checkpoint the evaluation loads back."""
    out = tmp_path / "ckpt"
    cmd = [sys.executable, str(REPO / "scripts" / "train_shapes.py"), "--out", str(out), "--kind-steps", "2", "--vision-steps", "2",
           "--steps", "2", "--images-per-step", "2", "--vision-batch", "4", "--eval-n", "4", "--log-every", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vision 1a step" in p.stdout and "vision 1b step" in p.stdout and "held-out (PyTorch greedy generate)" in p.stdout
    assert (out / "model.safetensors").is_file()
