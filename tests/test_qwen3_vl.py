"""Qwen3-VL end to end against transformers' Qwen3VLForConditionalGeneration and Qwen3VLProcessor: host-side
preprocessing, position-embedding taps, prompt expansion and M-RoPE positions; the tiny recipe through build,
verify (fp32 and fp16), lint and the TensorRT-RTX builder; and a second checkpoint of other dimensions built
without a recipe, whose greedy tokens must equal transformers' `generate`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli

# Qwen/Qwen3-VL-2B-Instruct's preprocessor_config.json (the image keys; its image_processor_type names the
# torchvision backend, the runtime reproduces transformers' PIL backend of the same class)
REAL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}

# A checkpoint unlike the tiny recipe's: GQA 3 (6 heads / 2 KV heads), untied LM head, 4 decoder layers, three
# deepstack layers at other ViT depths (one the last block), a 7x7 position table, an odd ViT width.
OTHER = {
    "seed": 3,
    "vision_config": dict(depth=5, hidden_size=48, intermediate_size=96, num_heads=3, out_hidden_size=80, patch_size=16,
                          temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=49,
                          deepstack_visual_indexes=[1, 3, 4], hidden_act="gelu_pytorch_tanh"),
    "text_config": dict(hidden_size=80, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
                        tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[3, 3, 2], mrope_interleaved=True)),
    "preprocessor": dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                         size={"shortest_edge": 2048, "longest_edge": 32 * 32 * 48}),
}


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("qwen3_vl")


@pytest.fixture(scope="module")
def checkpoint(cache_dir, adapter) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("qwen3-vl-tiny"), None, adapter, log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def model(adapter, checkpoint):
    return adapter.load(checkpoint)


@pytest.fixture(scope="module")
def build(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q3") / "qwen3-vl-tiny"
    run_cli("build", "qwen3-vl-tiny", "--out", out)
    return out


@pytest.fixture(scope="module")
def pipe(build):
    from mmexport.runtime.pipeline import Pipeline

    p = Pipeline(build)
    yield p
    p.close()


# -- host-side pieces against transformers --------------------------------------------------------------
@pytest.mark.parametrize("grid,side", [((6, 10), 8), ((14, 4), 8), ((2, 2), 48), ((34, 48), 48), ((12, 18), 7)])
def test_position_embedding_taps_equal_transformers(grid, side):
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from mmexport.families.qwen3_vl.runtime import position_embedding_taps

    h, w = grid
    idx, wts = position_embedding_taps(h, w, 2, side)
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, h, w]]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert np.array_equal(idx, ref_idx.numpy())
    assert wts.dtype == np.float32 and np.array_equal(wts, ref_w.numpy())  # bit for bit


def test_taps_resize_the_learned_table_bilinearly():
    """The taps' weighted gather is the table resized by F.interpolate(bilinear, align_corners), in merge-block order."""
    import torch
    import torch.nn.functional as F

    from mmexport.families.qwen2_vl.runtime import vision_position_ids
    from mmexport.families.qwen3_vl.runtime import position_embedding_taps

    side, dim, h, w = 9, 5, 10, 14
    table = torch.randn(side * side, dim, generator=torch.Generator().manual_seed(0))
    idx, wts = position_embedding_taps(h, w, 2, side)
    ours = (table[torch.from_numpy(idx)] * torch.from_numpy(wts)[:, :, None]).sum(1)
    resized = F.interpolate(table.T.reshape(1, dim, side, side), size=(h, w), mode="bilinear", align_corners=True)[0]
    rc = vision_position_ids(h, w, 2)
    want = resized[:, torch.from_numpy(rc[:, 0]), torch.from_numpy(rc[:, 1])].T
    assert torch.allclose(ours, want, atol=1e-6)


@pytest.mark.parametrize("config", ["real", "tiny"])
def test_preprocessing_equals_transformers_on_odd_sizes(config, checkpoint):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmexport.families.qwen2_vl.image import Qwen2VLImageParams, preprocess_image

    cfg = REAL_PREPROCESSOR if config == "real" else json.loads((checkpoint / "preprocessor_config.json").read_text())
    params = Qwen2VLImageParams.from_preprocessor_config(cfg)
    assert (params.patch_size, params.image_mean) == (16, (0.5, 0.5, 0.5))
    ref = Qwen2VLImageProcessorPil(**cfg) if config == "real" else Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    sizes = [(37, 211), (123, 77), (301, 299)] if config == "real" else [(37, 211), (123, 77), (640, 33), (250, 410)]
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, i)
        pv, grid = preprocess_image(img, params)
        want = ref(images=[img], return_tensors="np")
        assert list(grid) == want["image_grid_thw"][0].tolist()
        assert np.array_equal(pv, want["pixel_values"]), (h, w)


def test_rope_index_equals_transformers_with_text_between_images(model, pipe):
    import torch

    from mmexport.families.qwen2_vl.runtime import EncodedImage

    fam = pipe.family
    t = model.config
    grids = [(1, 6, 10), (1, 14, 4)]
    ids = [7, 8, t.vision_start_token_id, *[t.image_token_id] * 15, t.vision_end_token_id, 9, 10, 11,
           t.vision_start_token_id, *[t.image_token_id] * 14, t.vision_end_token_id, 12]
    ours, delta = fam.prompt_positions(np.asarray(ids), [EncodedImage(np.zeros((t * h * w, 1)), (t, h, w)) for t, h, w in grids])
    x = torch.tensor([ids])
    ref, ref_delta = model.model.get_rope_index(x, (x == t.image_token_id).int(), image_grid_thw=torch.tensor(grids))
    assert np.array_equal(ours, ref.numpy()) and delta == int(ref_delta)


def test_prompt_expansion_pixels_and_positions_equal_transformers(adapter, model, checkpoint, pipe):
    from mmexport.runtime.prompt import user_message

    images = [_image(97, 211, 1), _image(333, 65, 2)]
    ref = adapter.reference_inputs(model, checkpoint, user_message("What differs?", 2), images)
    prep = pipe.prepare("What differs?", images)
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    assert [im.grid_thw for im in prep.images] == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
    pos, delta = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], image_grid_thw=ref["image_grid_thw"])
    assert np.array_equal(prep.position_ids, pos.numpy()) and prep.rope_delta == int(delta)


# -- the tiny recipe ------------------------------------------------------------------------------------
def test_build_declares_deepstack(build, model):
    m = json.loads((build / "manifest.json").read_text())
    assert m["family"] == "qwen3_vl"
    spec = {name: {t["name"]: t for t in c["spec"]["inputs"]} for name, c in m["components"].items()}
    outs = {name: {t["name"]: t for t in c["spec"]["outputs"]} for name, c in m["components"].items()}
    n_deep = len(model.config.vision_config.deepstack_visual_indexes)
    assert set(spec["vision_encoder"]) == {"pixel_values", "pos_indices", "pos_weights", "rotary_cos", "rotary_sin"}
    assert outs["vision_encoder"]["deepstack_hidden"]["shape"] == [n_deep, "num_patches", 64]
    assert outs["projector"]["deepstack_embeds"]["shape"] == [n_deep, "num_tokens", 96]
    assert spec["decoder"]["deepstack_embeds"]["shape"] == [n_deep, "batch", "seq_len", 96]
    assert spec["decoder"]["position_ids"]["shape"] == [3, "batch", "seq_len"]


def _check_verify(rep: dict, bound: float) -> None:
    assert rep["passed"], rep["failures"]
    names = {(c["case"].split("[")[0], c["name"]) for c in rep["comparisons"]}
    for stage in ("vision_encoder", "vision_encoder deepstack_hidden", "projector", "projector deepstack_embeds", "decoder"):
        assert ("images", stage) in names, stage
    assert all(c["finite"] and c["max_abs"] <= bound for c in rep["comparisons"])
    checks = {(c["case"], c["name"]): c for c in rep["checks"]}
    assert checks[("images", "position ids")]["passed"]
    for case in ("images", "text-only"):
        greedy = next(c for (k, n), c in checks.items() if k == case and n.startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]


def test_verify_passes_fp32(build):
    _check_verify(json.loads(run_cli("verify", build, "--json").stdout), 1e-4)


def test_verify_passes_fp16(cache_dir, tmp_path):
    out = tmp_path / "fp16"
    run_cli("build", "qwen3-vl-tiny", "--precision", "fp16", "--out", out)
    rep = json.loads(run_cli("verify", out, "--json").stdout)
    _check_verify(rep, 2e-2)
    assert max(c["max_abs"] for c in rep["comparisons"] if c["name"].startswith("vision_encoder")) > 1e-5  # really fp16


def test_deepstack_is_live_and_zero_without_images(pipe):
    from mmexport.runtime.pipeline import KVCache

    prep = pipe.prepare("What is it?", [_image(90, 140, 5)])
    state = pipe.encode_images(prep.images)
    feeds = pipe.family.prefill_feeds(prep, state)
    ds = feeds["deepstack_embeds"]
    image = prep.input_ids == pipe.family.image_token_id
    assert ds.shape == (2, 1, len(prep.input_ids), 96)
    assert np.array_equal(ds[:, 0, image], state[0]["deepstack_embeds"]) and np.abs(ds).sum() > 0
    assert not ds[:, 0, ~image].any()
    embeds = pipe.family.prompt_embeds(pipe, prep, state)
    with_deep = pipe.decoder_step(embeds, feeds, KVCache(pipe.specs["decoder"]))
    without = pipe.decoder_step(embeds, {**feeds, "deepstack_embeds": np.zeros_like(ds)}, KVCache(pipe.specs["decoder"]))
    assert np.abs(with_deep - without).max() > 1e-2  # the decoder adds the features
    assert not pipe.family.step_feeds(prep, state, len(prep.input_ids))["deepstack_embeds"].any()
    text = pipe.prepare("Hello there.", [])
    assert not pipe.family.prefill_feeds(text, pipe.encode_images([]))["deepstack_embeds"].any()


def test_lint_clean_and_tensorrt_rtx_builds_every_component(build, tmp_path):
    rep = json.loads(run_cli("lint", build, "--json").stdout)
    assert not [f for f in rep["findings"] if f["severity"] == "error"]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(build, art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all((engine_dir / c["engine"]).stat().st_size > 0 for c in meta["components"].values())
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]
    rows = json.loads((art / "manifest.json").read_text())["limits"]["max_batch"]  # the decode profile's batch rows
    assert meta["components"]["decoder"]["input_shapes"]["decode"]["deepstack_embeds"]["max"] == [2, rows, 1, 96]


# -- another checkpoint, no recipe ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def other(adapter, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("q3-other") / "my-qwen3-vl"
    d.mkdir()
    for part in adapter.synthetic_parts(OTHER):
        part.save_pretrained(d)
    return d


def test_checkpoint_build_without_recipe_gives_generate_tokens(adapter, other, tmp_path):
    from mmexport.runtime.prompt import user_message

    out = tmp_path / "art"
    run_cli("build", other, "--out", out, "--max-context", "512")
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "qwen3_vl" and m["recipe"]["name"] == "my-qwen3-vl"
    paths = []
    for i, (h, w) in enumerate(((131, 47), (250, 199))):
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 10 + i).save(paths[-1])
    block = tmp_path / "block"  # the runtime runs with torch and transformers unimportable
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    env = {"PYTHONPATH": f"{block}:{REPO}"}
    torch_model = adapter.load(other)
    eos = set(torch_model.generation_config.eos_token_id)
    n = 12
    for prompt, imgs in (("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])):
        args = [a for p in imgs for a in ("--image", p)]
        run = run_cli("run", out, *args, "--prompt", prompt, "--max-new-tokens", n, "--json", env=env)
        ours = json.loads(run.stdout)["token_ids"]
        ref_in = adapter.reference_inputs(torch_model, other, user_message(prompt, len(imgs)), [Image.open(p) for p in imgs])
        ref = adapter.reference_generate(torch_model, ref_in, n)
        assert ours and ours == ref[: len(ours)], (prompt, ours, ref)
        assert len(ours) == n or ref[len(ours)] in eos
