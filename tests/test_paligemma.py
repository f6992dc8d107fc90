"""PaliGemma end to end against transformers' PaliGemmaForConditionalGeneration and PaliGemmaProcessor: SigLIP
preprocessing on odd sizes (SiglipImageProcessor, PIL), the processor's prompt (`<image>`s, BOS, text, "\\n"; no chat
template), the prefix-LM mask (the whole prompt bidirectional, generated tokens causal), positions from 1, the vision
tower's image count in ONNX Runtime, verify of the tiny recipe (Gemma 2: sliding windows, soft-capping) at fp32 and
fp16, a PaliGemma-1-style checkpoint (Gemma decoder) of other dimensions built without a recipe (`mmexport run` with
torch blocked = `generate`), lint and the TensorRT-RTX builder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towers_checks import (build_all, check_engines_and_lint, check_preprocess, check_run_equals_generate,
                           check_verify, check_vision_batch_counts, make_checkpoint, odd_image, save_images)

# google/paligemma2-3b-mix-224's preprocessor_config.json (image keys)
REAL_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": 256, "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
}
ODD = [(37, 211), (123, 77), (301, 299), (500, 13), (224, 224)]

# PaliGemma 1's layout (a Gemma decoder: no sliding window, no soft-capping) with other dimensions than
# recipes/paligemma-tiny.toml: 98-pixel pictures (49 tokens), 4 ViT layers, 3 decoder layers with 5 heads on 1 KV head.
OTHER = {
    "seed": 6, "tokenizer_vocab_size": 900,
    "vision_config": dict(image_size=98, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=3),
    "text_config": dict(model_type="gemma", hidden_size=80, intermediate_size=160, num_hidden_layers=3, num_attention_heads=5,
                        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6),
    "preprocessor": dict(size={"height": 98, "width": 98}, resample=2),
}


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("paligemma")


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    return make_checkpoint("paligemma", OTHER, tmp_path_factory.mktemp("pg-ckpt") / "my-paligemma")


@pytest.fixture(scope="module")
def builds(cache_dir, other, tmp_path_factory) -> dict[str, Path]:
    return build_all("paligemma-tiny", other, tmp_path_factory.mktemp("pg-build"))


@pytest.fixture(scope="module")
def tiny_ckpt(adapter, cache_dir) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    return resolve_source(load_recipe("paligemma-tiny"), None, adapter, log=lambda m: None)[0]


@pytest.fixture(scope="module")
def other_model(adapter, other):
    return adapter.load(other)


@pytest.mark.parametrize("kind", ["real", "tiny"])
def test_preprocessing_equals_siglip_pil_on_odd_sizes(kind, adapter, tiny_ckpt):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from mmexport.families.towers_runtime import FixedImageParams, preprocess_fixed

    if kind == "real":
        params = FixedImageParams.from_preprocessor_config(REAL_PREPROCESSOR, adapter.image_defaults())
        ref = SiglipImageProcessorPil(**REAL_PREPROCESSOR)
        assert params.out_size == (224, 224)
    else:
        params, ref = adapter.image_params(tiny_ckpt), SiglipImageProcessorPil.from_pretrained(tiny_ckpt)
    check_preprocess(params, ref, ODD, preprocess_fixed)


def test_vision_tower_image_count_is_dynamic_in_onnx_runtime(builds, adapter, tiny_ckpt):
    check_vision_batch_counts(builds["tiny"], adapter, adapter.load(tiny_ckpt), (1, 2))


def test_prompt_equals_paligemma_processor_and_prefix_is_bidirectional(builds, adapter, other, other_model):
    """The runtime's prompt = PaliGemmaProcessor's input_ids (image tokens, one BOS after them, the text, "\\n"), its
    positions count from 1, and the decoder's prefix block is what transformers computes: with the whole prompt as one
    bidirectional block the logits equal transformers' (with token_type_ids), with a causal prompt they do not."""
    import torch

    from mmexport.runtime.pipeline import KVCache, Pipeline
    from mmexport.runtime.prompt import user_message

    img = odd_image(97, 211, 1)
    pipe = Pipeline(builds["other"])
    try:
        for imgs, prompt in (([img], "caption en"), ([], "answer en what is a river?")):
            prep = pipe.prepare(prompt, imgs)
            ref = adapter.reference_inputs(other_model, other, user_message(prompt, len(imgs)), imgs)
            assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
            bos = other_model.config.text_config.bos_token_id
            assert list(prep.input_ids).count(bos) == 1 and prep.input_ids[49 * len(imgs)] == bos
            assert prep.text.endswith(prompt + "\n")
            assert np.array_equal(prep.position_ids[0], np.arange(1, len(prep.input_ids) + 1))
            assert not ref["token_type_ids"].any()  # the whole prompt is prefix
            state = pipe.encode_images(prep.images)
            embeds = pipe.family.prompt_embeds(pipe, prep, state)
            feeds = pipe.family.prefill_feeds(prep, state)
            assert feeds["image_block_ids"].min() == 1
            with torch.no_grad():
                want = other_model(**ref).logits[0, -1].numpy()
            got = pipe.decoder_step(embeds, feeds, KVCache(pipe.specs["decoder"]))
            causal = pipe.decoder_step(embeds, {**feeds, "image_block_ids": np.zeros_like(feeds["image_block_ids"])},
                                       KVCache(pipe.specs["decoder"]))
            assert np.abs(got.reshape(-1) - want).max() < 1e-4
            assert np.abs(causal.reshape(-1) - want).max() > 1e-3
            assert not pipe.family.step_feeds(prep, state, len(prep.input_ids))["image_block_ids"].any()
    finally:
        pipe.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    rep = check_verify(builds["tiny" if precision == "fp32" else "tiny-fp16"], 1e-4 if precision == "fp32" else 2e-2, 1)
    if precision == "fp16":
        assert max(c["max_abs"] for c in rep["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16


def test_other_checkpoint_run_equals_generate(builds, adapter, other, other_model, tmp_path):
    m = json.loads((builds["other"] / "manifest.json").read_text())
    assert m["family"] == "paligemma" and m["limits"]["max_images"] == 1
    assert m["model"]["tokens_per_image"] == 49
    # the checkpoint ships no chat template: the build writes the processor's prompt format in its place
    assert (builds["other"] / m["tokenizer"]["chat_template"]).read_text() == adapter.chat_template_for(other)
    paths = save_images(tmp_path / "imgs", [(131, 47)])
    check_run_equals_generate(builds["other"], other, adapter, other_model,
                              [("describe en", paths), ("Write one sentence about rivers.", [])], tmp_path)


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    meta = check_engines_and_lint(builds["tiny"], tmp_path)
    decode = meta["components"]["decoder"]["input_shapes"]["decode"]["image_block_ids"]
    rows = json.loads((builds["tiny"] / "manifest.json").read_text())["limits"]["max_batch"]
    assert decode["max"] == [rows, 1]  # one generated token per batch row
