"""Molmo2 end to end against transformers' Molmo2ForConditionalGeneration and its processor.

Preprocessing and prompt expansion: transformers' Molmo2 processors exist only with a torchvision backend,
which mmexport does not install, so the runtime is compared with golden data that scripts/molmo2_golden.py
wrote from the real processors (torchvision 0.29.1, tests/data/molmo2_golden.npz), and — when
MMEXPORT_TORCHVISION_VENV names a Python environment with torchvision — with a fresh run of that script.
The tiny recipe through build, verify (fp32 and fp16; verify's reference is transformers' image processor with
its two torchvision calls done by the PyTorch calls behind them), lint and the TensorRT-RTX builder; and a
checkpoint of other dimensions built without a recipe, whose greedy tokens must equal transformers' `generate`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from parity import parallel_builds

sys.path.insert(0, str(REPO / "scripts"))
import molmo2_golden as golden  # noqa: E402

GOLDEN = REPO / "tests" / "data" / "molmo2_golden.npz"

# A checkpoint unlike the tiny recipe's: 196-px crops, ViT 4 x 48 tapping layers -2 and 1, adapter width 48 with
# 2 heads over the 96-wide concatenation, OLMo-style q/k norm over the whole projection, norm after each sublayer,
# linear-scaled rotary on layers 0 and 2 only, GQA 3 (6 heads / 2 KV heads), 3 decoder layers, CLIP statistics
OTHER = {
    "seed": 3,
    "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                          num_key_value_heads=3, head_dim=16, image_size=[196, 196], patch_size=14,
                          hidden_act="gelu_pytorch_tanh"),
    "adapter_config": dict(vision_feature_layer=[-2, 1], hidden_size=48, num_attention_heads=2, num_key_value_heads=2,
                           head_dim=24, intermediate_size=80, text_hidden_size=96),
    "text_config": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
                        qk_norm_type="olmo", norm_after=True, rope_scaling_layers=[0, 2],
                        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500000.0)),
    "preprocessor": dict(size={"height": 196, "width": 196}, max_crops=3, overlap_margins=[2, 2], patch_size=14,
                         pooling_size=[2, 2], image_mean=[0.48145466, 0.4578275, 0.40821073],
                         image_std=[0.26862954, 0.26130258, 0.27577711]),
}


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


# -- preprocessing and prompt expansion vs the real (torchvision) processors ---------------------------------
def _check_golden(path: Path) -> None:
    from mmexport.families.molmo2.image import Molmo2ImageParams, image_grid, preprocess_image

    d = np.load(path)
    seed = 0
    for name, cfg in golden.CONFIGS.items():
        p = Molmo2ImageParams.from_preprocessor_config(cfg)
        for h, w in golden.SIZES[name]:
            seed += 1
            key = f"{name}/{h}x{w}"
            enc = preprocess_image(golden.make_image(h, w, seed), p)
            m = np.asarray(p.image_mean, np.float32) * np.float32(255)
            s = np.asarray(p.image_std, np.float32) * np.float32(255)
            want = (golden.undelta(d[f"{key}/level_deltas"]).astype(np.float32) - m) / s
            ours = golden.to_raster(enc.pixel_values, p.patch_size)
            assert ours.shape == want.shape, key
            assert np.abs(ours - want).max() <= 1e-5, key  # bit-identical here; the bound
            assert np.array_equal(enc.pooling, d[f"{key}/image_token_pooling"]), key
            assert list(enc.grid) == d[f"{key}/image_grids"][0].tolist(), key
            assert enc.num_crops == int(d[f"{key}/image_num_crops"][0]), key
            assert image_grid(h, w, p) == (enc.grid, enc.num_crops), key


def test_preprocessing_equals_the_torchvision_processor_golden_data():
    _check_golden(GOLDEN)


@pytest.mark.skipif(not os.environ.get("MMEXPORT_TORCHVISION_VENV"), reason="set MMEXPORT_TORCHVISION_VENV to a venv with torchvision")
def test_preprocessing_and_prompt_equal_a_fresh_torchvision_run(tmp_path):
    """Opt-in: scripts/molmo2_golden.py run now with torchvision, and the runtime compared with its output."""
    py = Path(os.environ["MMEXPORT_TORCHVISION_VENV"]) / "bin" / "python"
    out = tmp_path / "golden.npz"
    subprocess.run([str(py), str(REPO / "scripts" / "molmo2_golden.py"), str(out)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=600)
    _check_golden(out)
    fresh, committed = np.load(out), np.load(GOLDEN)
    for k in committed.files:
        if k != "versions":
            assert np.array_equal(fresh[k], committed[k]), k


def test_prompt_expansion_equals_the_processor_golden_data(pipe):
    """Molmo2Processor's prompt (BOS, low-res then high-res grids with <im_col>, start and end tokens) and its
    mm_token_type_ids (the decoder's image block ids), from the golden file."""
    d = np.load(GOLDEN)
    first = 1 + len(golden.SIZES["real"])
    images = [golden.make_image(h, w, first + i) for i, (h, w) in enumerate(golden.PROMPT_IMAGES)]
    for case, imgs in (("two_images", images), ("text_only", [])):
        prep = pipe.prepare("What differs?", imgs)
        assert np.array_equal(prep.input_ids, d[f"prompt/{case}/input_ids"]), case
        feeds = pipe.family.prefill_feeds(prep, None)
        assert np.array_equal(feeds["image_block_ids"][0], d[f"prompt/{case}/mm_token_type_ids"]), case
        assert np.array_equal(feeds["position_ids"][0], np.arange(len(prep.input_ids)))
    assert pipe.family.step_feeds(prep, None, 9)["position_ids"].tolist() == [[9]]


def test_prompt_and_pixels_equal_the_reference_inputs(adapter, model, checkpoint, pipe):
    """The same against what verify compares with (transformers' image processor and Molmo2Processor's own
    replace_image_token): other sizes, one image with many crops."""
    from mmexport.runtime.prompt import user_message

    images = [_image(97, 405, 1), _image(333, 65, 2)]
    ref = adapter.reference_inputs(model, checkpoint, user_message("Compare them.", 2), images)
    prep = pipe.prepare("Compare them.", images)
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
    assert np.array_equal(np.concatenate([im.pooling for im in prep.images]), ref["image_token_pooling"].numpy())
    assert np.array_equal(prep.extras["image_block_ids"], ref["mm_token_type_ids"].numpy())


# -- the tiny recipe -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("molmo2")


@pytest.fixture(scope="module")
def checkpoint(cache_dir, adapter) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("molmo2-tiny"), None, adapter, log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def model(adapter, checkpoint):
    return adapter.load(checkpoint)


@pytest.fixture(scope="module")
def other(adapter, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("molmo2-other") / "my-molmo2"
    d.mkdir()
    for part in adapter.synthetic_parts(OTHER):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(checkpoint, other, tmp_path_factory) -> dict[str, Path]:
    """The module's three builds side by side: the tiny recipe at fp32 and fp16, the other checkpoint without a recipe."""
    root = tmp_path_factory.mktemp("molmo2-build")
    jobs = {
        "tiny": ("build", "molmo2-tiny"),
        "tiny-fp16": ("build", "molmo2-tiny", "--precision", "fp16"),
        "other": ("build", other, "--max-context", "1024"),
    }
    return parallel_builds(jobs, root, timeout=1200)


@pytest.fixture(scope="module")
def pipe(builds):
    from mmexport.runtime.pipeline import Pipeline

    p = Pipeline(builds["tiny"])
    yield p
    p.close()


def _check_verify(rep: dict, bound: float) -> None:
    assert rep["passed"], rep["failures"]
    names = {(c["case"].split("[")[0], c["name"]) for c in rep["comparisons"]}
    for stage in ("preprocess", "vision_encoder", "projector", "decoder"):
        assert ("images", stage) in names, stage
    assert all(c["finite"] and c["max_abs"] <= bound for c in rep["comparisons"])
    checks = {(c["case"], c["name"]): c for c in rep["checks"]}
    for case in ("images", "text-only"):
        assert checks[(case, "prompt tokens")]["passed"]
        greedy = next(c for (k, n), c in checks.items() if k == case and n.startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]


def test_verify_passes_fp32(builds):
    _check_verify(json.loads(run_cli("verify", builds["tiny"], "--json").stdout), 1e-4)


def test_verify_passes_fp16(builds):
    rep = json.loads(run_cli("verify", builds["tiny-fp16"], "--json").stdout)
    _check_verify(rep, 2e-2)
    assert max(c["max_abs"] for c in rep["comparisons"] if c["name"].startswith("vision_encoder")) > 1e-5  # really fp16


def test_image_features_are_added_and_image_tokens_see_each_other(pipe):
    """The merge adds the features to the <im_patch> embeddings (not replaces them), and the block ids change the
    prompt's logits (an image token sees the later ones)."""
    from mmexport.runtime.pipeline import KVCache

    prep = pipe.prepare("What is it?", [_image(90, 140, 5)])
    state = pipe.encode_images(prep.images)
    text = pipe.embed(prep.input_ids)
    merged = pipe.family.prompt_embeds(pipe, prep, state)
    patch = prep.input_ids == pipe.family.image_token_id
    assert np.allclose(merged[0, patch], text[0, patch] + state[0]) and np.array_equal(merged[0, ~patch], text[0, ~patch])
    feeds = pipe.family.prefill_feeds(prep, state)
    assert feeds["image_block_ids"].sum() > patch.sum()  # start/end/column tokens are in the block too
    with_blocks = pipe.decoder_step(merged, feeds, KVCache(pipe.specs["decoder"]))
    causal = pipe.decoder_step(merged, {**feeds, "image_block_ids": np.zeros_like(feeds["image_block_ids"])}, KVCache(pipe.specs["decoder"]))
    assert np.abs(with_blocks - causal).max() > 1e-3


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    rep = json.loads(run_cli("lint", builds["tiny"], "--json").stdout)
    assert not [f for f in rep["findings"] if f["severity"] == "error"]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(builds["tiny"], art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all((engine_dir / c["engine"]).stat().st_size > 0 for c in meta["components"].values())
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]


# -- another checkpoint, no recipe -----------------------------------------------------------------------------
def test_checkpoint_build_without_recipe_gives_generate_tokens(adapter, other, builds, tmp_path, torch_blocked):
    from mmexport.runtime.prompt import user_message

    out = builds["other"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "molmo2" and m["recipe"]["name"] == "my-molmo2"
    paths = []
    for i, (h, w) in enumerate(((131, 47), (250, 330))):
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 10 + i).save(paths[-1])
    env = {"PYTHONPATH": f"{torch_blocked}:{REPO}"}  # the runtime runs with torch and transformers unimportable
    torch_model = adapter.load(other)
    eos = set(torch_model.generation_config.eos_token_id)
    n = 12
    for prompt, imgs in (("Compare the two pictures.", paths), ("Describe it.", paths[1:]), ("Write one sentence about rivers.", [])):
        args = [a for p in imgs for a in ("--image", p)]
        run = run_cli("run", out, *args, "--prompt", prompt, "--max-new-tokens", n, "--json", env=env)
        ours = json.loads(run.stdout)["token_ids"]
        ref_in = adapter.reference_inputs(torch_model, other, user_message(prompt, len(imgs)), [Image.open(p) for p in imgs])
        ref = adapter.reference_generate(torch_model, ref_in, n)
        assert ours and ours == ref[: len(ours)], (prompt, ours, ref)
        assert len(ours) == n or ref[len(ours)] in eos
