"""InternVL (-hf format, families/internvl) against transformers: the shared dynamic-grid choice and pixel shuffle
(runtime/imageops, families/parts) vs GotOcr2's get_optimal_tiled_canvas and InternVL's pixel_shuffle,
preprocessing vs GotOcr2ImageProcessorPil on odd sizes that give different grids, prompt expansion and pixels vs
InternVLProcessor; the internvl-tiny recipe through build, verify (fp32, fp16), lint and the TensorRT-RTX builder;
and a checkpoint of other dimensions (RMSNorm + q/k-norm InternViT, final LayerNorm, 16 tokens per tile, untied
head) built without a recipe, whose `mmexport run` tokens (torch blocked) equal transformers' greedy `generate`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from parity import parallel_builds

# OpenGVLab/InternVL3-1B-hf's preprocessor_config.json (image keys); InternVLProcessor turns crop_to_patches on
REAL = dict(size={"height": 448, "width": 448}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
            resample=3, min_patches=1, max_patches=12, crop_to_patches=False)
ODD = [(37, 211), (123, 77), (301, 299), (500, 130), (97, 300), (20, 20)]

OTHER = {
    "seed": 4,
    "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=56,
                          patch_size=7, norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False, hidden_act="gelu"),
    "text_config": dict(model_type="qwen2", hidden_size=80, intermediate_size=160, num_hidden_layers=4, num_attention_heads=5,
                        num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "preprocessor": dict(max_patches=4, min_patches=1, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2),
}


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    from mmexport.families import get_adapter

    d = tmp_path_factory.mktemp("internvl-ckpt") / "my-internvl"
    for part in get_adapter("internvl").synthetic_parts(OTHER):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(cache_dir, other_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """internvl-tiny at fp32 and fp16, and the other checkpoint with no recipe, side by side."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    recipe = load_recipe("internvl-tiny")
    resolve_source(recipe, None, get_adapter(recipe.family), log=lambda m: None)
    root = tmp_path_factory.mktemp("build")
    jobs = {"tiny": ("build", "internvl-tiny"), "tiny-fp16": ("build", "internvl-tiny", "--precision", "fp16"),
            "other": ("build", other_checkpoint, "--max-context", "1024")}
    return parallel_builds(jobs, root)


# -- shared tiling pieces against transformers ------------------------------------------------------------
@pytest.mark.parametrize("lo,hi", [(1, 12), (1, 6), (2, 9), (1, 1)])
def test_grid_choice_equals_get_optimal_tiled_canvas(lo, hi):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_all_supported_aspect_ratios, get_optimal_tiled_canvas

    from mmexport.runtime.imageops import best_tile_grid, supported_tile_grids

    assert supported_tile_grids(lo, hi) == list(get_all_supported_aspect_ratios(lo, hi))
    rng = np.random.default_rng(lo * 100 + hi)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))] + [(448, 448), (448, 896), (100, 300), (224, 448)]
    seen = set()
    for h, w in sizes:
        got = best_tile_grid(h, w, 448, 448, lo, hi)
        assert got == tuple(get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)), (h, w)
        seen.add(got)
    assert len(seen) >= min(5, len(supported_tile_grids(lo, hi)))


def test_pixel_shuffle_twins_equal_internvl():
    import torch
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from mmexport.families.parts import pixel_shuffle_tokens as torch_shuffle
    from mmexport.runtime.imageops import pixel_shuffle_tokens as np_shuffle

    for side, c in ((4, 3), (8, 5), (32, 2)):
        x = torch.randn(3, side * side, c, generator=torch.Generator().manual_seed(side))
        want = InternVLModel.pixel_shuffle(None, x.reshape(3, side, side, c), 0.5).reshape(3, -1, 4 * c)  # uses no state
        assert torch.equal(torch_shuffle(x, 2), want)
        assert np.array_equal(np_shuffle(x.numpy(), 2), want.numpy())


@pytest.mark.parametrize("config", ["real", "tiny", "one-tile"])
def test_preprocessing_equals_transformers_on_odd_sizes(config):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from mmexport.families.internvl.image import InternVLImageParams, preprocess_internvl

    cfg = {"real": REAL, "tiny": dict(size={"height": 56, "width": 56}, max_patches=6),
           "one-tile": dict(size={"height": 56, "width": 56}, max_patches=1)}[config]
    ref = GotOcr2ImageProcessorPil(**cfg)
    params = InternVLImageParams.from_preprocessor_config(json.loads(ref.to_json_string()))
    grids = set()
    for i, (h, w) in enumerate(ODD):
        img = _image(h, w, i)
        tiles, grid = preprocess_internvl(img, params)
        want = ref(images=[img], return_tensors="np", crop_to_patches=True)
        assert tiles.shape == want["pixel_values"].shape and int(want["num_patches"][0]) == tiles.shape[0], (h, w)
        assert np.abs(tiles - want["pixel_values"]).max() <= 1e-5, (h, w)
        assert tiles.shape[0] <= params.max_tiles()
        grids.add(grid)
    assert len(grids) >= (1 if config == "one-tile" else 4)


def test_prompt_and_pixels_equal_internvl_processor(builds, cache_dir):
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    adapter = get_adapter("internvl")
    ckpt, _ = resolve_source(load_recipe("internvl-tiny"), None, adapter, log=lambda m: None)
    model = adapter.load(ckpt)
    images = [_image(97, 211, 1), _image(333, 65, 2), _image(60, 58, 3)]
    ref = adapter.reference_inputs(model, ckpt, user_message("What differs?", 3), images)
    pipe = Pipeline(builds["tiny"])
    try:
        prep = pipe.prepare("What differs?", images)
    finally:
        pipe.close()
    assert [(im.cols, im.rows) for im in prep.images] == [(2, 1), (1, 5), (1, 1)]
    assert [im.num_tiles for im in prep.images] == [3, 6, 1]  # a thumbnail only with more than one tile
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
    assert prep.text.count("<img>") == prep.text.count("</img>") == 3


# -- the tiny recipe ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    r = json.loads(run_cli("verify", builds["tiny" if precision == "fp32" else "tiny-fp16"], "--json", check=None).stdout)
    assert r["passed"], r["failures"]
    assert r["precision"] == precision
    names = {(c["case"], c["name"]) for c in r["comparisons"]}
    for i in range(3):
        assert {(f"images[{i}]", s) for s in ("preprocess", "vision_encoder", "projector")} <= names
    assert all(c["finite"] for c in r["comparisons"])
    for case in ("images", "text-only"):
        greedy = next(c for c in r["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]
    if precision == "fp16":
        assert max(c["max_abs"] for c in r["comparisons"] if c["name"] == "vision_encoder") > 1e-5


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    tiny = builds["tiny"]
    lint = json.loads(run_cli("lint", tiny, "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] in ("error", "warning")]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(tiny, art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all((engine_dir / c["engine"]).stat().st_size > 0 for c in meta["components"].values())
    tiles = next(iter(meta["components"]["vision_encoder"]["input_shapes"].values()))["pixel_values"]
    assert tiles["min"][0] == 1 and tiles["max"][0] == 7  # up to 6 tiles + the thumbnail


# -- another checkpoint, no recipe ------------------------------------------------------------------------
def test_other_checkpoint_run_equals_generate(builds, other_checkpoint, tmp_path):
    from mmexport.families import get_adapter
    from mmexport.runtime.prompt import user_message

    out = builds["other"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "internvl" and m["recipe"]["name"] == "my-internvl"
    paths = []
    for i, (h, w) in enumerate(((131, 47), (250, 199))):
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 10 + i).save(paths[-1])
    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    adapter = get_adapter("internvl")
    model = adapter.load(other_checkpoint)
    assert model.config.vision_config.use_qk_norm and not model.config.vision_config.use_mean_pooling
    eos = set(m["tokenizer"]["eos_token_ids"])
    n = 16
    for prompt, imgs in (("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])):
        args = [a for p in imgs for a in ("--image", p)]
        ours = json.loads(run_cli("run", out, *args, "--prompt", prompt, "--max-new-tokens", n, "--json",
                                  env={"PYTHONPATH": f"{block}:{REPO}"}).stdout)
        ref_in = adapter.reference_inputs(model, other_checkpoint, user_message(prompt, len(imgs)), [Image.open(p) for p in imgs])
        ref = adapter.reference_generate(model, ref_in, n)
        assert ours["prompt_tokens"] == ref_in["input_ids"].shape[1]
        assert ours["calls"].get("vision_encoder", 0) == len(imgs)
        k = len(ours["token_ids"])
        assert k > 0 and ours["token_ids"] == ref[:k] and (k == n or ref[k] in eos), (prompt, ours["token_ids"], ref)
