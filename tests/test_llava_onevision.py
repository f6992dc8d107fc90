"""LLaVA-OneVision end to end against transformers' LlavaOnevisionForConditionalGeneration and its processor: the
prompt (anyres token counts per image size, the multi-image path) and pixels through the built runtime, each image's
packed features (unpad, anyres_max shrink, newlines) from the graphs + host against get_image_features, the tiny
recipe through verify (fp32 and fp16), lint and the TensorRT-RTX builder, and a checkpoint of other dimensions built
without a recipe whose greedy tokens equal `generate` (one image: anyres; two images; text only) with torch blocked.
The host-side pieces alone are in test_llava_onevision_preprocess.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towers_checks import (
    build_all, check_engines_and_lint, check_run_equals_generate, check_verify, check_vision_batch_counts, make_checkpoint,
    odd_image, save_images,
)

# A checkpoint unlike the tiny recipe's: 42-pixel views of 14-pixel patches (9 tokens per view), 3 SigLIP layers of an
# odd width with the second-to-last layer's features, pinpoints up to 2x4 tiles with anyres_max_3, a decoder of
# 3 layers with 6 heads / 2 KV heads and an untied LM head, CLIP's mean/std.
OTHER = {
    "seed": 5,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_3",
    "vision_config": dict(image_size=42, patch_size=14, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                          num_attention_heads=5),
    "text_config": dict(hidden_size=72, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "preprocessor": dict(size={"height": 42, "width": 42},
                         image_grid_pinpoints=[[42, 42], [42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [84, 168], [168, 84]]),
}


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("llava_onevision")


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint("llava_onevision", OTHER, tmp_path_factory.mktemp("ov-other") / "my-onevision")


@pytest.fixture(scope="module")
def builds(cache_dir, other_ckpt, tmp_path_factory) -> dict[str, Path]:
    return build_all("llava-onevision-tiny", other_ckpt, tmp_path_factory.mktemp("ov"))


@pytest.fixture(scope="module")
def checkpoint(cache_dir, adapter) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("llava-onevision-tiny"), None, adapter, log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def model(adapter, checkpoint):
    return adapter.load(checkpoint)


@pytest.fixture(scope="module")
def pipe(builds):
    from mmexport.runtime.pipeline import Pipeline

    p = Pipeline(builds["tiny"])
    yield p
    p.close()


# -- prompt, pixels, packed features -----------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[(97, 211)], [(170, 61)], [(160, 165)], [(97, 211), (40, 150)], [(33, 45), (150, 90), (77, 77)]],
                         ids=["wide", "tall", "square-3x3-shrunk", "two", "three"])
def test_prompt_pixels_and_image_features_equal_transformers(adapter, model, checkpoint, pipe, sizes):
    """One image: anyres tiles (the count depends on its size); several: one padded view each; the prompt's tokens,
    every view's pixels and the packed image embeddings (graphs + host packing) against the processor and
    get_image_features."""
    import torch

    from mmexport.runtime.prompt import user_message

    images = [odd_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    ref = adapter.reference_inputs(model, checkpoint, user_message("What is here?", len(images)), images)
    prep = pipe.prepare("What is here?", images)
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    views = adapter._views(model, ref)
    for im, v in zip(prep.images, views):
        assert (im.grid is None) == (len(images) > 1)
        assert im.pixel_values.shape == tuple(v.shape) and np.abs(im.pixel_values - v.numpy()).max() <= 1e-5
    with torch.no_grad():
        want = model.model.get_image_features(ref["pixel_values"], ref["image_sizes"], batch_num_images=ref["batch_num_images"]).pooler_output
    got = pipe.encode_images(prep.images)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < 1e-4
    if len(images) == 1 and prep.images[0].grid == (3, 3):
        assert len(got[0]) < 16 + 12 * 13  # the 12x12 map shrunk (anyres_max_2)


def test_manifest_and_views_per_call(builds, adapter, model):
    m = json.loads((builds["tiny"] / "manifest.json").read_text())
    assert m["family"] == "llava_onevision"
    ov = m["model"]["onevision"]
    assert ov["side"] == 4 and ov["vision_aspect_ratio"] == "anyres_max_2"
    assert np.array_equal(np.asarray(ov["image_newline"], dtype=np.float32), model.model.image_newline.detach().numpy())
    dims = m["components"]["vision_encoder"]["spec"]["dims"]["num_images"]
    assert dims["max"] == 10  # one image's 3x3 tiles + its base view in one call
    check_vision_batch_counts(builds["tiny"], adapter, model, counts=(1, 3, 10))


# -- the tiny recipe ----------------------------------------------------------------------------------------
def test_verify_passes_fp32(builds):
    check_verify(builds["tiny"], 1e-4, 3)


def test_verify_passes_fp16(builds):
    rep = check_verify(builds["tiny-fp16"], 2e-2, 3)
    assert max(c["max_abs"] for c in rep["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    check_engines_and_lint(builds["tiny"], tmp_path)


# -- another checkpoint, no recipe --------------------------------------------------------------------------
def test_checkpoint_build_without_recipe_gives_generate_tokens(builds, adapter, other_ckpt, tmp_path):
    m = json.loads((builds["other"] / "manifest.json").read_text())
    assert m["family"] == "llava_onevision" and m["recipe"]["name"] == "my-onevision"
    one, two, three = save_images(tmp_path / "img", [(131, 47), (120, 170), (61, 90)])
    model = adapter.load(other_ckpt)
    cases = [("Describe the picture.", [two]), ("Compare the two pictures.", [one, three]), ("Write one sentence about rivers.", [])]
    check_run_equals_generate(builds["other"], other_ckpt, adapter, model, cases, tmp_path)


def test_build_refuses_pinpoints_that_differ_between_config_and_preprocessor(adapter, model, checkpoint, tmp_path):
    import shutil

    from mmexport.errors import UserError
    from mmexport.recipes import load_recipe

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint, d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["image_grid_pinpoints"] = pre["image_grid_pinpoints"][:-1]
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(UserError, match="image_grid_pinpoints"):
        adapter.specs(model, load_recipe("llava-onevision-tiny"), d)
    assert [c.name for c in adapter.specs(model, load_recipe("llava-onevision-tiny"), checkpoint)][:2] == ["vision_encoder", "projector"]
