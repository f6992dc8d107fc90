"""Fuyu end to end against transformers' FuyuForCausalLM and FuyuProcessor: the resize against Pillow and
torchvision (golden data), patches and the prompt (|SPEAKER| rows, |NEWLINE|, BOS, <0x04>) against FuyuProcessor,
`verify` of the tiny recipe at fp32 and fp16, a second checkpoint of other dimensions (another patch size)
built with `mmexport build CHECKPOINT_DIR` and run against `generate`, and the TensorRT-RTX builder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from parity import parallel_builds

GOLDEN = REPO / "tests" / "data" / "fuyu_golden.npz"

# Other dimensions than recipes/fuyu-tiny.toml: 20x20 patches (tiny: 30x30), a 160x200 canvas, 3 layers of
# width 120 with 6 heads (head_dim 20, 8 of it rotary), another seed and vocabulary.
SECOND = {
    "seed": 3,
    "tokenizer_vocab_size": 900,
    "text_config": dict(hidden_size=120, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6, hidden_act="relu2",
                        qk_layernorm=True, layer_norm_eps=1e-5, max_position_embeddings=1024,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.4)),
    "preprocessor": dict(size={"height": 160, "width": 200}, patch_size={"height": 20, "width": 20}),
}
# (height, width) inside the tiny canvas (180 x 120) and the second one (160 x 200): padded, cropped to whole patches
ODD_SIZES = ((123, 77), (41, 119), (17, 23))


def _odd_image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("fuyu-images")
    out = []
    for i, (h, w) in enumerate(ODD_SIZES):
        p = d / f"odd{i}.png"
        _odd_image(h, w, 20 + i).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    from mmexport.families import get_adapter

    d = tmp_path_factory.mktemp("checkpoints") / "fuyu-second"
    for part in get_adapter("fuyu").synthetic_parts(SECOND):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(cache_dir, second_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny recipe at fp32 and fp16 and the second checkpoint with no recipe, built side by side."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    recipe = load_recipe("fuyu-tiny")
    resolve_source(recipe, None, get_adapter(recipe.family), log=lambda m: None)
    root = tmp_path_factory.mktemp("build")
    jobs = {
        "tiny": ("build", "fuyu-tiny"),
        "tiny-fp16": ("build", "fuyu-tiny", "--precision", "fp16"),
        "second": ("build", second_checkpoint),
    }
    return parallel_builds(jobs, root)


@pytest.fixture(scope="module")
def second_model(second_checkpoint):
    from mmexport.families import get_adapter

    adapter = get_adapter("fuyu")
    return adapter, adapter.load(second_checkpoint)


def test_bilinear_resize_equals_pillow_bit_for_bit():
    """imageops' antialiased bilinear resize in Pillow's rounding is Pillow's BILINEAR, down and up, odd sizes (its
    torchvision rounding, which Fuyu uses, is checked against torchvision by the golden data below)."""
    from PIL import Image

    from mmexport.runtime.imageops import resize_bilinear_aa_uint8

    rng = np.random.default_rng(5)
    for (h, w), (nh, nw) in (((61, 37), (60, 36)), ((93, 115), (60, 74)), ((31, 200), (13, 90)), ((40, 41), (81, 23)), ((7, 300), (7, 11))):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.array(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))
        assert np.array_equal(resize_bilinear_aa_uint8(a, nh, nw, "pil"), want), (h, w, nh, nw)


def test_preprocessing_and_prompt_equal_fuyu_processor(builds, second_checkpoint, second_model, odd_images):
    """The runtime against FuyuProcessor (transformers' prompt layout, placeholder rows, the split after <s>, the
    dropped word-boundary piece, crop + patchify) on odd sizes, on the second checkpoint's 20x20 patches; the
    padded canvas against FuyuImageProcessorPil itself; and a text-only prompt (the tokenizer's BOS)."""
    import torch
    from PIL import Image
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    from mmexport.families.fuyu.image import padded_pixels
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    adapter, model = second_model
    pipe = Pipeline(builds["second"])
    ip = FuyuImageProcessorPil.from_pretrained(second_checkpoint)
    try:
        for path in odd_images:
            pil = Image.open(path)
            prep = pipe.prepare("Describe the picture.", [pil])
            ref = adapter.reference_inputs(model, second_checkpoint, user_message("Describe the picture.", 1), [pil])
            assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
            assert np.abs(prep.images[0].pixel_values - ref["pixel_values"].numpy()).max() <= 1e-5
            canvas, h, w = padded_pixels(pil, pipe.family.image_params)
            want = ip(pil, return_tensors="pt")
            assert np.abs(canvas - want["images"][0, 0].numpy()).max() <= 1e-5
            assert (h, w) == (int(want["image_unpadded_heights"][0, 0]), int(want["image_unpadded_widths"][0, 0]))
            n = int((prep.input_ids == model.config.image_token_id).sum())
            assert n == prep.images[0].num_patches == len(ref["pixel_values"])
        prep = pipe.prepare("Write one sentence about the sea.", [])
        ref = adapter.reference_inputs(model, second_checkpoint, user_message("Write one sentence about the sea.", 0), [])
        assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy()) and "pixel_values" not in ref
        assert isinstance(ref["input_ids"], torch.Tensor)
    finally:
        pipe.close()


def _golden_cases(tokenizer_dir: Path, golden: Path):
    """(runtime, prompt builder, golden arrays) with the golden data's canvas."""
    import dataclasses

    from mmexport.families.fuyu.runtime import FuyuRuntime
    from mmexport.runtime.prompt import PromptBuilder

    g = np.load(golden)
    m = json.loads((tokenizer_dir / "manifest.json").read_text())
    tok_file = tokenizer_dir / m["tokenizer"]["file"]
    assert hashlib.sha256(tok_file.read_bytes()).hexdigest() == str(g["tokenizer_sha256"]), \
        "the tiny recipe's tokenizer changed: regenerate tests/data/fuyu_golden.npz (scripts/fuyu_golden.py)"
    rt = FuyuRuntime(m["model"])
    h, w = (int(v) for v in g["canvas"])
    rt.image_params = dataclasses.replace(rt.image_params, height=h, width=w)
    prompts = PromptBuilder((tokenizer_dir / m["tokenizer"]["chat_template"]).read_text(), tok_file, {})
    return rt, prompts, g


def test_golden_torchvision_processor(builds):
    """tests/data/fuyu_golden.npz: transformers' FuyuProcessor with its torchvision FuyuImageProcessor (the one that
    runs inside FuyuProcessor in transformers 5.x), written by scripts/fuyu_golden.py: odd sizes that are padded,
    resized down in one or both sides, or exactly the canvas -> pixels within 1e-5 and token ids identical."""
    from PIL import Image

    from mmexport.runtime.prompt import user_message

    rt, prompts, g = _golden_cases(builds["tiny"], GOLDEN)
    n = 0
    resized = 0
    while f"image_{n}" in g:
        arr = g[f"image_{n}"]
        img = rt.preprocess(Image.fromarray(arr))
        want = g[f"pixel_values_{n}"]
        assert img.pixel_values.shape == want.shape and np.abs(img.pixel_values - want).max() <= 1e-5, n
        _, ids = rt.prompt_ids(prompts, prompts.render(user_message(str(g[f"prompt_{n}"]), 1)), [img])
        assert ids == g[f"input_ids_{n}"].tolist(), n
        resized += arr.shape[0] > g["canvas"][0] or arr.shape[1] > g["canvas"][1]
        n += 1
    assert n >= 5 and resized >= 3
    _, ids = rt.prompt_ids(prompts, prompts.render(user_message(str(g["text_prompt"]), 0)), [])
    assert ids == g["text_input_ids"].tolist()


@pytest.mark.skipif(not os.environ.get("MMEXPORT_TORCHVISION_VENV"), reason="set MMEXPORT_TORCHVISION_VENV to a venv with torchvision")
def test_golden_data_is_current(tmp_path):
    """Opt-in: regenerate the golden data with torchvision now and compare it with the committed file."""
    py = Path(os.environ["MMEXPORT_TORCHVISION_VENV"]) / "bin" / "python"
    out = tmp_path / "golden.npz"
    subprocess.run([str(py), "scripts/fuyu_golden.py", str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True, timeout=600)
    new, old = np.load(out), np.load(GOLDEN)
    assert sorted(new.files) == sorted(old.files)
    for k in old.files:
        assert np.array_equal(new[k], old[k]), k


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    r = json.loads(run_cli("verify", builds["tiny" if precision == "fp32" else "tiny-fp16"], "--json", check=None).stdout)
    assert r["passed"], r["failures"]
    assert r["precision"] == precision
    names = {(c["case"], c["name"]) for c in r["comparisons"]}
    assert {("images[0]", "preprocess"), ("images[0]", "vision_encoder"), ("images", "decoder"), ("text-only", "decoder")} <= names
    for case in ("images", "text-only"):
        greedy = next(c for c in r["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]
        assert next(c for c in r["checks"] if c["case"] == case and c["name"] == "prompt tokens")["passed"]


def test_second_checkpoint_run_equals_generate(builds, second_checkpoint, second_model, odd_images, tmp_path, torch_blocked):
    """`mmexport run --json` on the recipe-less build of another checkpoint, torch and transformers unimportable:
    token ids identical to transformers' greedy generate through FuyuProcessor, with an image and text-only."""
    from PIL import Image

    from mmexport.runtime.prompt import user_message

    adapter, model = second_model
    art = builds["second"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["family"] == "fuyu" and m["source"]["path"] == str(second_checkpoint) and m["limits"]["max_images"] == 1
    assert m["components"]["vision_encoder"]["spec"]["inputs"][0]["shape"][1] == 3 * 20 * 20
    eos = set(m["tokenizer"]["eos_token_ids"])
    for images, prompt in (([odd_images[0]], "Describe the picture."), ([], "Write one sentence about the sea.")):
        args = ["run", art, "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        for p in images:
            args += ["--image", p]
        ours = json.loads(run_cli(*args, env={"PYTHONPATH": f"{torch_blocked}:{REPO}"}).stdout)
        pil = [Image.open(p) for p in images]
        ref_in = adapter.reference_inputs(model, second_checkpoint, user_message(prompt, len(pil)), pil)
        ref = adapter.reference_generate(model, ref_in, 20)
        assert ours["prompt_tokens"] == ref_in["input_ids"].shape[1]
        assert ours["calls"]["vision_encoder"] == len(images)
        n = len(ours["token_ids"])
        assert n > 0 and ours["token_ids"] == ref[:n] and (n == 20 or ref[n] in eos)
    two = run_cli("run", art, "--prompt", "x", "--image", odd_images[0], "--image", odd_images[1], check=None)
    assert two.returncode != 0 and "at most 1" in two.stderr + two.stdout


def test_tensorrt_rtx_builds_every_component_and_lint_is_clean(builds, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(builds["tiny"], art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "embed_tokens", "decoder"}
    for comp in meta["components"].values():
        assert (engine_dir / comp["engine"]).stat().st_size > 0
    lint = json.loads(run_cli("lint", builds["tiny"], "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] == "error"]
