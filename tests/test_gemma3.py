"""Gemma 3 end to end against transformers' Gemma3ForConditionalGeneration and Gemma3Processor: preprocessing on odd
sizes (Gemma3ImageProcessor, PIL), gemma-3-4b-it's chat template with `<start_of_image>` expanded to the processor's
full image sequence, the per-image bidirectional blocks (transformers' token_type_ids -> block ids) and how they
combine with sliding windows, the vision tower's image count in ONNX Runtime, verify of the tiny recipe at fp32 and
fp16, a checkpoint of other dimensions built without a recipe (`mmexport run` with torch blocked = `generate`, two
images and text-only), lint and the TensorRT-RTX builder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towers_checks import (build_all, check_engines_and_lint, check_preprocess, check_run_equals_generate,
                           check_verify, check_vision_batch_counts, make_checkpoint, odd_image, save_images)

# google/gemma-3-4b-it's preprocessor_config.json (image keys)
REAL_PREPROCESSOR = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": 256, "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896},
}
ODD = [(37, 211), (123, 77), (301, 299), (500, 13), (896, 896)]

# Other dimensions than recipes/gemma3-tiny.toml: 84-pixel pictures pooled to 3x3 = 9 soft tokens, 4 ViT layers,
# 5 decoder layers (sliding, sliding, global, sliding, sliding) with a 4-token window, 6 heads on 2 KV heads.
OTHER = {
    "seed": 7, "tokenizer_vocab_size": 900, "mm_tokens_per_image": 9,
    "vision_config": dict(image_size=84, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=3),
    "text_config": dict(hidden_size=72, intermediate_size=160, num_hidden_layers=5, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                                     "sliding_attention"],
                        max_position_embeddings=1024, rms_norm_eps=1e-6),
    "preprocessor": dict(size={"height": 84, "width": 84}),
}


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("gemma3")


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    return make_checkpoint("gemma3", OTHER, tmp_path_factory.mktemp("g3-ckpt") / "my-gemma3")


@pytest.fixture(scope="module")
def builds(cache_dir, other, tmp_path_factory) -> dict[str, Path]:
    return build_all("gemma3-tiny", other, tmp_path_factory.mktemp("g3-build"))


@pytest.fixture(scope="module")
def tiny_ckpt(adapter, cache_dir) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    return resolve_source(load_recipe("gemma3-tiny"), None, adapter, log=lambda m: None)[0]


@pytest.fixture(scope="module")
def other_model(adapter, other):
    return adapter.load(other)


@pytest.mark.parametrize("kind", ["real", "tiny"])
def test_preprocessing_equals_gemma3_pil_on_odd_sizes(kind, adapter, tiny_ckpt):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from mmexport.families.towers_runtime import FixedImageParams, preprocess_fixed

    if kind == "real":
        params = FixedImageParams.from_preprocessor_config(REAL_PREPROCESSOR, adapter.image_defaults())
        ref = Gemma3ImageProcessorPil(**{k: v for k, v in REAL_PREPROCESSOR.items() if v is not None})
        assert params.out_size == (896, 896) and params.resample == 2
    else:
        params, ref = adapter.image_params(tiny_ckpt), Gemma3ImageProcessorPil.from_pretrained(tiny_ckpt)
    check_preprocess(params, ref, ODD, preprocess_fixed)


def test_pan_and_scan_is_refused(adapter):
    from mmexport.errors import UserError
    from mmexport.families.towers_runtime import FixedImageParams

    with pytest.raises(UserError, match="pan-and-scan"):
        FixedImageParams.from_preprocessor_config({**REAL_PREPROCESSOR, "do_pan_and_scan": True}, adapter.image_defaults())


def test_vision_tower_image_count_is_dynamic_in_onnx_runtime(builds, adapter, tiny_ckpt):
    check_vision_batch_counts(builds["tiny"], adapter, adapter.load(tiny_ckpt), (1, 2, 3))


def test_prompt_blocks_and_sliding_windows_equal_transformers(builds, adapter, other, other_model):
    """Gemma3Processor's input_ids (BOS from the template, each `<start_of_image>` -> "\\n\\n<start_of_image>" + 9 soft
    tokens + "<end_of_image>\\n\\n"), block ids = transformers' from token_type_ids (+1), and the decoder's logits with
    those blocks = transformers' (sliding windows of 4 < 9 soft tokens: the window also limits the blocks); without
    blocks (causal) they differ."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    from mmexport.runtime.pipeline import KVCache, Pipeline
    from mmexport.runtime.prompt import user_message

    images = [odd_image(97, 211, 1), odd_image(333, 65, 2)]
    pipe = Pipeline(builds["other"])
    try:
        for imgs, prompt in ((images, "What differs?"), ([], "Say hello.")):
            prep = pipe.prepare(prompt, imgs)
            ref = adapter.reference_inputs(other_model, other, user_message(prompt, len(imgs)), imgs)
            assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
            assert list(prep.input_ids).count(other_model.config.text_config.bos_token_id) == 1
            if not imgs:
                continue
            assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
            feeds = pipe.family.prefill_feeds(prep, pipe.encode_images(prep.images))
            want_blocks = get_block_sequence_ids_for_mask(ref["token_type_ids"]).numpy() + 1
            assert np.array_equal(feeds["image_block_ids"], want_blocks) and feeds["image_block_ids"].max() == 2
            state = pipe.encode_images(prep.images)
            embeds = pipe.family.prompt_embeds(pipe, prep, state)
            with torch.no_grad():
                want = other_model(**ref).logits[0, -1].numpy()
            got = pipe.decoder_step(embeds, feeds, KVCache(pipe.specs["decoder"]))
            causal = pipe.decoder_step(embeds, {**feeds, "image_block_ids": np.zeros_like(feeds["image_block_ids"])},
                                       KVCache(pipe.specs["decoder"]))
            assert np.abs(got.reshape(-1) - want).max() < 1e-4
            assert np.abs(causal.reshape(-1) - want).max() > 1e-3
    finally:
        pipe.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    rep = check_verify(builds["tiny" if precision == "fp32" else "tiny-fp16"], 1e-4 if precision == "fp32" else 2e-2, 3)
    if precision == "fp16":
        assert max(c["max_abs"] for c in rep["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16


def test_other_checkpoint_run_equals_generate(builds, adapter, other, other_model, tmp_path):
    m = json.loads((builds["other"] / "manifest.json").read_text())
    assert m["family"] == "gemma3" and m["model"]["tokens_per_image"] == 9
    paths = save_images(tmp_path / "imgs", [(131, 47), (250, 199)])
    check_run_equals_generate(builds["other"], other, adapter, other_model,
                              [("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])], tmp_path)


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    meta = check_engines_and_lint(builds["tiny"], tmp_path)
    decode = meta["components"]["decoder"]["input_shapes"]["decode"]["image_block_ids"]
    rows = json.loads((builds["tiny"] / "manifest.json").read_text())["limits"]["max_batch"]
    assert decode["max"] == [rows, 1]  # one generated token per batch row
