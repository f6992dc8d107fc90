"""Idefics3 and SmolVLM (families/idefics3, families/smolvlm) against transformers: tiling preprocessing vs the
PIL processors on odd sizes that give different grids, the shared pixel shuffle vs the connector's, prompt
expansion vs Idefics3Processor / SmolVLMProcessor; the smolvlm-tiny recipe through build, verify (fp32, fp16),
lint (no NonZero: transformers drops padding images and buckets positions with boolean indexing) and the
TensorRT-RTX builder; and an Idefics3 checkpoint of other dimensions built without a recipe, whose `mmexport run`
tokens (torch blocked) equal transformers' greedy `generate` with two images and text-only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from parity import parallel_builds

# HuggingFaceTB/SmolVLM-256M-Instruct's preprocessor_config.json (the image keys) and Idefics3-8B-Llama3's
REAL = {
    "smolvlm": dict(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, image_mean=[0.5] * 3,
                    image_std=[0.5] * 3, resample=1, do_image_splitting=True),
    "idefics3": dict(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364}, image_mean=[0.5] * 3,
                     image_std=[0.5] * 3, resample=1, do_image_splitting=True),
}
# (h, w) -> grids 1x4, 4x3, 4x4, 4x2 at the real sizes; other grids at the tiny ones; the last is one tile there
ODD = [(37, 211), (123, 77), (301, 299), (500, 130), (41, 43)]

# An Idefics3 checkpoint unlike smolvlm-tiny: model_type idefics3, 48-px tiles of 12-px patches, 2x pixel
# shuffle, GQA 5/1, untied LM head, 4 decoder layers, an odd ViT width.
OTHER = {
    "seed": 5,
    "scale_factor": 2,
    "vision_config": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                          image_size=48, patch_size=12, hidden_act="gelu_pytorch_tanh"),
    "text_config": dict(hidden_size=80, intermediate_size=160, num_hidden_layers=4, num_attention_heads=5,
                        num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "preprocessor": dict(size={"longest_edge": 144}, image_mean=[0.48, 0.45, 0.4], image_std=[0.27, 0.26, 0.28]),
}


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    from mmexport.families import get_adapter

    d = tmp_path_factory.mktemp("idefics3-ckpt") / "my-idefics3"
    for part in get_adapter("idefics3").synthetic_parts(OTHER):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(cache_dir, other_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """smolvlm-tiny at fp32 and fp16, and the Idefics3 checkpoint with no recipe, side by side."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    recipe = load_recipe("smolvlm-tiny")
    resolve_source(recipe, None, get_adapter(recipe.family), log=lambda m: None)
    root = tmp_path_factory.mktemp("build")
    jobs = {"tiny": ("build", "smolvlm-tiny"), "tiny-fp16": ("build", "smolvlm-tiny", "--precision", "fp16"),
            "other": ("build", other_checkpoint, "--max-context", "1024")}
    return parallel_builds(jobs, root)


# -- host side against transformers -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
@pytest.mark.parametrize("config", ["real", "tiny", "no-split"])
def test_preprocessing_equals_transformers_on_odd_sizes(family, config):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from mmexport.families.idefics3.image import Idefics3ImageParams, preprocess_idefics3

    cfg = {"real": REAL[family], "tiny": dict(size={"longest_edge": 192}, max_image_size={"longest_edge": 64}),
           "no-split": dict(size={"longest_edge": 192}, max_image_size={"longest_edge": 64}, do_image_splitting=False)}[config]
    ref = (SmolVLMImageProcessorPil if family == "smolvlm" else Idefics3ImageProcessorPil)(**cfg)
    params = Idefics3ImageParams.from_preprocessor_config(json.loads(ref.to_json_string()))
    grids = set()
    for i, (h, w) in enumerate(ODD):
        img = _image(h, w, i)
        tiles, rows, cols = preprocess_idefics3(img, params)
        want = ref(images=[img], return_tensors="np", return_row_col_info=True)
        assert (rows, cols) == (want["rows"][0][0], want["cols"][0][0]), (h, w)
        assert tiles.shape == want["pixel_values"][0].shape and tiles.dtype == np.float32
        assert np.abs(tiles - want["pixel_values"][0]).max() <= 1e-5, (h, w)
        assert want["pixel_attention_mask"].all()  # full tiles: the graph needs no mask
        assert tiles.shape[0] <= params.max_tiles()
        grids.add((rows, cols))
    assert len(grids) >= (1 if config == "no-split" else 4)


@pytest.mark.parametrize("rows,cols", [(0, 0), (1, 4), (3, 2), (4, 4)])
def test_image_prompt_equals_processors(rows, cols):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    from mmexport.families.idefics3.image import image_prompt

    want = get_image_prompt_string(rows, cols, 5, "<fake_token_around_image>", "<image>", "<global-img>")
    assert image_prompt(rows, cols, 5) == want


def test_pixel_shuffle_twins_equal_the_connector():
    import torch
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    from mmexport.families.parts import pixel_shuffle_tokens as torch_shuffle
    from mmexport.runtime.imageops import pixel_shuffle_tokens as np_shuffle

    for scale, side, c in ((2, 6, 5), (4, 8, 3), (3, 9, 2)):
        x = torch.randn(3, side * side, c, generator=torch.Generator().manual_seed(scale))
        want = SmolVLMConnector.pixel_shuffle(None, x, scale)  # uses no state
        assert torch.equal(Idefics3Connector.pixel_shuffle(None, x, scale), want)
        assert torch.equal(torch_shuffle(x, scale), want)
        assert np.array_equal(np_shuffle(x.numpy(), scale), want.numpy())


def test_prompt_and_pixels_equal_smolvlm_processor(builds, cache_dir):
    """Two images of different grids in one prompt: token ids (tile tags, rows, global view) and pixels identical to
    SmolVLMProcessor's."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    adapter = get_adapter("smolvlm")
    ckpt, _ = resolve_source(load_recipe("smolvlm-tiny"), None, adapter, log=lambda m: None)
    model = adapter.load(ckpt)
    images = [_image(97, 211, 1), _image(333, 65, 2), _image(30, 30, 3)]
    ref = adapter.reference_inputs(model, ckpt, user_message("What differs?", 3), images)
    pipe = Pipeline(builds["tiny"])
    try:
        prep = pipe.prepare("What differs?", images)
    finally:
        pipe.close()
    assert [(im.rows, im.cols) for im in prep.images] == [(2, 3), (3, 1), (3, 3)]  # a small image is scaled up to the longest edge
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"][0].numpy())
    assert "<row_2_col_3>" in prep.text and prep.text.count("<global-img>") == 3


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
    if precision == "fp16":  # really fp16
        assert max(c["max_abs"] for c in r["comparisons"] if c["name"] == "vision_encoder") > 1e-5


def test_graphs_have_no_nonzero_lint_clean_and_tensorrt_rtx_builds(builds, tmp_path):
    import onnx

    tiny = builds["tiny"]
    for comp in ("vision_encoder", "projector"):
        ops = {n.op_type for n in onnx.load(tiny / "onnx" / f"{comp}.onnx", load_external_data=False).graph.node}
        assert not ops & {"NonZero", "Bucketize", "Where", "If", "Loop"}, (comp, ops)
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
    assert tiles["min"][0] == 1 and tiles["max"][0] == 10  # 3x3 tiles + the global view


# -- another checkpoint (Idefics3), no recipe -----------------------------------------------------------
def test_other_checkpoint_run_equals_generate(builds, other_checkpoint, tmp_path):
    from mmexport.families import get_adapter
    from mmexport.runtime.prompt import user_message

    out = builds["other"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "idefics3" and m["recipe"]["name"] == "my-idefics3"
    paths = []
    for i, (h, w) in enumerate(((131, 47), (250, 199))):
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 10 + i).save(paths[-1])
    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    adapter = get_adapter("idefics3")
    model = adapter.load(other_checkpoint)
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
