"""LLaVA-1.5 end to end against transformers' LlavaForConditionalGeneration and LlavaProcessor: preprocessing on odd
sizes (CLIPImageProcessor and the pad-to-square LlavaImageProcessor, PIL), prompt expansion with llava-1.5's chat
template, the vision tower's image count in ONNX Runtime at 1/2/3 pictures, verify of the tiny recipe at fp32 and
fp16, a checkpoint of other dimensions built without a recipe (`mmexport run` with torch blocked = `generate`, two
images and text-only), lint and the TensorRT-RTX builder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towers_checks import (build_all, check_engines_and_lint, check_preprocess, check_run_equals_generate,
                           check_verify, check_vision_batch_counts, make_checkpoint, odd_image, save_images)

# llava-hf/llava-1.5-7b-hf's preprocessor_config.json (image keys)
REAL_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
ODD = [(37, 211), (123, 77), (301, 299), (500, 13), (336, 336)]

# Other dimensions than recipes/llava-tiny.toml: two feature layers concatenated ([-3, -1]) with the "full" strategy
# (class token kept), 12-pixel patches on 84-pixel pictures (50 tokens), a resize larger than the crop, 4 decoder
# layers with 5 heads on 1 KV head, untied LM head.
OTHER = {
    "seed": 5, "tokenizer_vocab_size": 900,
    "vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
    "vision_config": dict(image_size=84, patch_size=12, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=3, projection_dim=48, hidden_act="quick_gelu"),
    "text_config": dict(hidden_size=80, intermediate_size=160, num_hidden_layers=4, num_attention_heads=5,
                        num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "preprocessor": dict(size={"shortest_edge": 90}, crop_size={"height": 84, "width": 84}),
}


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("llava")


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    return make_checkpoint("llava", OTHER, tmp_path_factory.mktemp("llava-ckpt") / "my-llava")


@pytest.fixture(scope="module")
def builds(cache_dir, other, tmp_path_factory) -> dict[str, Path]:
    return build_all("llava-tiny", other, tmp_path_factory.mktemp("llava-build"))


@pytest.fixture(scope="module")
def other_model(adapter, other):
    return adapter.load(other)


@pytest.mark.parametrize("kind", ["clip-real", "llava-pad", "tiny"])
def test_preprocessing_equals_transformers_pil_on_odd_sizes(kind, adapter, cache_dir):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mmexport.checkpoints import resolve_source
    from mmexport.families.towers_runtime import FixedImageParams, preprocess_fixed
    from mmexport.recipes import load_recipe

    if kind == "tiny":
        d, _ = resolve_source(load_recipe("llava-tiny"), None, adapter, log=lambda m: None)
        params, ref = adapter.image_params(d), CLIPImageProcessorPil.from_pretrained(d)
    elif kind == "clip-real":
        params = FixedImageParams.from_preprocessor_config(REAL_PREPROCESSOR, adapter.image_defaults())
        ref = CLIPImageProcessorPil(**REAL_PREPROCESSOR)
    else:  # LLaVA's pad-to-square processor (mean-coloured square, then resize and crop), bilinear, other size
        cfg = {"do_pad": True, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 2}
        defaults = {**adapter.image_defaults(), "do_pad": False}
        params = FixedImageParams.from_preprocessor_config(cfg, defaults)
        ref = LlavaImageProcessorPil(**cfg)
        assert params.do_pad
    check_preprocess(params, ref, ODD, preprocess_fixed)


def test_vision_tower_image_count_is_dynamic_in_onnx_runtime(builds, adapter, cache_dir):
    """One vision_encoder call with 1, 2 and 3 pictures (traced with 2) = transformers' tower and projector."""
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("llava-tiny"), None, adapter, log=lambda m: None)
    check_vision_batch_counts(builds["tiny"], adapter, adapter.load(d), (1, 2, 3))


def test_prompt_and_pixels_equal_llava_processor(builds, adapter, other, other_model):
    """The runtime's prompt (llava-1.5's chat template, `<image>` expanded, the BOS the tokenizer adds) and pixels =
    LlavaProcessor's input_ids and pixel_values; the two images go through the vision tower in one call."""
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    images = [odd_image(97, 211, 1), odd_image(333, 65, 2)]
    pipe = Pipeline(builds["other"])
    try:
        for imgs, prompt in ((images, "What differs?"), ([], "Say hello.")):
            prep = pipe.prepare(prompt, imgs)
            ref = adapter.reference_inputs(other_model, other, user_message(prompt, len(imgs)), imgs)
            assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
            assert prep.text.startswith("USER: ") and prep.text.endswith(" ASSISTANT:")
            assert prep.input_ids[0] == other_model.config.text_config.bos_token_id
            if imgs:
                assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
                assert (prep.input_ids == other_model.config.image_token_id).sum() == 2 * 50  # 7x7 patches + class token
        state = pipe.encode_images(pipe.prepare("x", images).images)
        assert [s.shape for s in state] == [(50, 80), (50, 80)]
    finally:
        pipe.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    rep = check_verify(builds["tiny" if precision == "fp32" else "tiny-fp16"], 1e-4 if precision == "fp32" else 2e-2, 3)
    if precision == "fp16":
        assert max(c["max_abs"] for c in rep["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16


def test_other_checkpoint_run_equals_generate(builds, adapter, other, other_model, tmp_path):
    m = json.loads((builds["other"] / "manifest.json").read_text())
    assert m["family"] == "llava" and m["recipe"]["name"] == "my-llava"
    assert m["model"]["tokens_per_image"] == 50
    paths = save_images(tmp_path / "imgs", [(131, 47), (250, 199)])
    check_run_equals_generate(builds["other"], other, adapter, other_model,
                              [("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])], tmp_path)


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    check_engines_and_lint(builds["tiny"], tmp_path)
