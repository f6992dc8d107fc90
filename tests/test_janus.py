"""Janus (understanding path) end to end against transformers' JanusForConditionalGeneration: preprocessing against
JanusImageProcessorPil on odd sizes, the prompt against JanusProcessor (system prompt, image start/end tokens,
placeholders, BOS), `verify` of the tiny recipe at fp32 and fp16, a second checkpoint of other dimensions built with
`mmexport build CHECKPOINT_DIR` and run against `generate` (text mode), and the TensorRT-RTX builder."""
from __future__ import annotations

import numpy as np
import pytest

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
