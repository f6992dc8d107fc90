"""Janus (understanding path) end to end against transformers' JanusForConditionalGeneration: preprocessing against
JanusImageProcessorPil on odd sizes, the prompt against JanusProcessor (system prompt, image start/end tokens,
placeholders, BOS), the vision tower's image count in ONNX Runtime at 1/2 pictures, `verify` of the tiny recipe at
fp32 and fp16, a second checkpoint of other dimensions built with `mmexport build CHECKPOINT_DIR` and run against
`generate` in its text mode (two images and text-only, torch blocked), lint and the TensorRT-RTX builder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towers_checks import (build_all, check_engines_and_lint, check_run_equals_generate, check_verify,
                           check_vision_batch_counts, make_checkpoint, save_images)

# Other dimensions than recipes/janus-tiny.toml: a 48x48 image of 8x8 patches (36 image tokens; tiny: 64x64 of 16x16,
# 16), 3 ViT layers of width 48 / 3 heads, a 3-layer aligner, a 3-layer decoder of width 120 with GQA 3:1 and an
# untied LM head, another processor (min_size 20, BILINEAR).
SECOND = {
    "seed": 5,
    "tokenizer_vocab_size": 900,
    "vision_config": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=48, patch_size=8, mlp_ratio=3.0,
                          projection_dim=120, depth=3, hidden_act="gelu"),
    "text_config": dict(hidden_size=120, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "preprocessor": dict(min_size=20, resample=2),
}

# (height, width): tall, wide, small (upscaled), extreme (clamped to min_size), one pixel off square, square
ODD_SIZES = ((500, 37), (41, 600), (13, 9), (1000, 3), (3, 1000), (200, 201), (77, 77))


def _random_image(h: int, w: int, mode: str = "RGB", seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


@pytest.mark.parametrize("kwargs", [
    {},  # Janus-Pro's settings: 384, min_size 14, CLIP mean/std, BICUBIC
    {"size": {"height": 224, "width": 224}, "min_size": 30, "resample": 2},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 96, "width": 96}},
])
def test_preprocessing_equals_janus_pil_processor(kwargs):
    """Resize of the longest edge (min_size floor, Python rounding), centred padding with the mean colour, rescale and
    normalize: equal to transformers' JanusImageProcessorPil on tall, wide, small and extreme images."""
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from mmexport.families.janus.image import JanusImageParams, preprocess_image

    ip = JanusImageProcessorPil(**kwargs)
    params = JanusImageParams.from_preprocessor_config(ip.to_dict())
    assert params.background_color == tuple(ip.background_color)
    for i, (h, w) in enumerate(ODD_SIZES):
        im = _random_image(h, w, seed=i)
        want = ip(images=im, return_tensors="np")["pixel_values"][0]
        got = preprocess_image(im, params)
        assert got.shape == want.shape == (3, params.size, params.size)
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5, (kwargs, h, w)


def test_preprocessing_non_rgb_images():
    """With do_convert_rgb (transparency composited onto white) grayscale and RGBA images equal transformers'; without
    it transformers refuses them and the runtime converts them the same way instead."""
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from mmexport.families.janus.image import JanusImageParams, preprocess_image

    ip = JanusImageProcessorPil(do_convert_rgb=True, size={"height": 96, "width": 96})
    params = JanusImageParams.from_preprocessor_config(ip.to_dict())
    plain = JanusImageParams.from_preprocessor_config({**ip.to_dict(), "do_convert_rgb": None})
    for mode in ("L", "RGBA", "LA"):
        im = _random_image(70, 31, mode)
        want = ip(images=im, return_tensors="np")["pixel_values"][0]
        assert np.abs(preprocess_image(im, params) - want).max() <= 1e-5, mode
        assert np.array_equal(preprocess_image(im, plain), preprocess_image(im, params)), mode
        with pytest.raises(ValueError):
            JanusImageProcessorPil(size={"height": 96, "width": 96})(images=im, return_tensors="np")


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("janus")


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    """A synthetic Janus checkpoint of other dimensions, saved as a plain Hugging Face directory."""
    return make_checkpoint("janus", SECOND, tmp_path_factory.mktemp("janus-ckpt") / "my-janus")


@pytest.fixture(scope="module")
def builds(cache_dir, second_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny recipe at fp32 and fp16 and the second checkpoint without a recipe, built side by side."""
    return build_all("janus-tiny", second_checkpoint, tmp_path_factory.mktemp("janus-build"))


@pytest.fixture(scope="module")
def second_model(adapter, second_checkpoint):
    return adapter.load(second_checkpoint)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    return save_images(tmp_path_factory.mktemp("janus-images"), [(201, 70), (33, 250), (23, 17)])  # tall, wide, small


def test_chat_template_is_the_checkpoints_one():
    """The template transformers' Janus conversion writes into deepseek-community/Janus-Pro-* (digest of the string in
    transformers' convert_janus_weights_to_hf.py)."""
    import hashlib

    from mmexport.families.janus.export import CHAT_TEMPLATE_FILE

    digest = hashlib.sha256(CHAT_TEMPLATE_FILE.read_bytes()).hexdigest()
    assert digest == "ca86eba863fa87feee121798ddc615b986b2642757e8e472d66d82fe256124a2"


def test_prompt_and_pixels_equal_janus_processor(builds, adapter, second_checkpoint, second_model, odd_images):
    """The torch-free runtime against JanusProcessor (text mode): the default system prompt, <begin_of_image> +
    <image_placeholder> x 36 + <end_of_image> per image, the BOS its tokenizer adds, and the pixels, with zero, one
    and two images, and a multi-turn conversation with the images in a later turn."""
    from PIL import Image

    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    model = second_model
    pil = [Image.open(p) for p in odd_images]
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Hello there. "}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image"}, {"type": "image"}]},
    ]
    pipe = Pipeline(builds["other"])
    try:
        cases = [(user_message(" Describe the picture. ", n), pil[:n], pipe.prepare(" Describe the picture. ", pil[:n])) for n in (0, 1, 2)]
        cases.append((chat, pil[1:], pipe.prepare_chat(chat, pil[1:])))
        for messages, images, prep in cases:
            ref = adapter.reference_inputs(model, second_checkpoint, messages, images)
            assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy()), messages
            assert len(prep.images) == len(images) == len(ref.get("pixel_values", []))
            for got, want in zip(prep.images, ref.get("pixel_values", [])):
                assert np.abs(pipe.family.reference_pixels(got)[0] - want.numpy()).max() <= 1e-5
            assert prep.input_ids.tolist().count(model.config.image_token_id) == 36 * len(images)
            assert prep.input_ids[0] == model.config.text_config.bos_token_id
            assert prep.text.startswith("You are a helpful language and vision assistant.")
    finally:
        pipe.close()


def test_vision_tower_takes_any_image_count(builds, adapter, second_model):
    check_vision_batch_counts(builds["other"], adapter, second_model, counts=(1, 2))


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_verify_tiny_passes(precision, bound, builds):
    """Every component on transformers' own inputs, the whole chain, and greedy tokens; fp16 on its own build."""
    check_verify(builds["tiny" if precision == "fp32" else "tiny-fp16"], bound, n_images=3)


def test_second_checkpoint_run_equals_generate(builds, adapter, second_checkpoint, second_model, odd_images, tmp_path):
    """`mmexport run --json` on the recipe-less build of another checkpoint, with torch and transformers unimportable:
    token ids identical to transformers' greedy generate (text mode) through JanusProcessor and the chat template."""
    import json

    m = json.loads((builds["other"] / "manifest.json").read_text())
    assert m["family"] == "janus" and m["source"] == {**m["source"], "kind": "local", "path": str(second_checkpoint)}
    cases = [("Compare the two pictures.", odd_images[:2]), ("Write one sentence about the sea.", [])]
    check_run_equals_generate(builds["other"], second_checkpoint, adapter, second_model, cases, tmp_path, n=20)


def test_tensorrt_rtx_builds_every_component_and_lint_is_clean(builds, tmp_path):
    check_engines_and_lint(builds["tiny"], tmp_path)


def test_bench_times_transformers_generate_in_text_mode(builds):
    """`bench --vs-pytorch`: Janus's generate (text mode) drops a logits_processor, so the eager side times its steps
    with a forward hook; the eager vision/projector stages are timed and its tokens agree with ours."""
    import json

    from conftest import run_cli

    r = json.loads(run_cli("bench", builds["tiny"], "--new-tokens", "3", "--repeat", "1", "--vs-pytorch", "--sequential", "--json").stdout)
    assert r["agreement"]["identical"] and r["eager"]["tokens_generated"] == 3
    t = {k: v["median"] for k, v in r["eager"]["timings_ms"].items()}
    assert t["vision"] > 0 and t["projector"] > 0 and t["decode"] > 0
