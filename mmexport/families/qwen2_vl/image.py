"""Qwen2-VL image preprocessing, torch-free (numpy + Pillow), composed from mmexport.runtime.imageops.

A re-implementation of transformers' PIL-backend processor
`transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil` (transformers 5.x),
step for step, so that the result is bit-for-bit the same pixel_values and image_grid_thw:

1. convert to RGB, compositing any transparency onto white (`imageops.to_rgb`);
2. `smart_resize` to a size divisible by patch_size * merge_size with a pixel count inside
   [min_pixels, max_pixels], and resize the *uint8* PIL image with Pillow (BICUBIC by default);
3. rescale: `uint8 -> float64 * rescale_factor -> float32`; normalize in float32: `(x - mean) / std`;
4. patchify into `[grid_h * grid_w, C * temporal_patch_size * patch_size * patch_size]`, the rows in
   merge-block order, each patch repeated temporal_patch_size times along the temporal axis.

Qwen2.5-VL and Qwen3-VL use the same processor (other patch sizes and means come from their
preprocessor_config.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import (MAX_ASPECT_RATIO, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, patchify_merge_blocks, rescale_normalize,
                                 resized_chw, smart_resize, triple)

__all__ = ["Qwen2VLImageParams", "smart_resize", "preprocess_image"]

# Qwen2VLImageProcessorPil's class defaults.
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_DEFAULT_PATCH_SIZE = 14
_DEFAULT_TEMPORAL_PATCH_SIZE = 2
_DEFAULT_MERGE_SIZE = 2
_DEFAULT_RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC



@dataclass(frozen=True)
class Qwen2VLImageParams(ParamsDict):
    """Everything `preprocess_image` needs; the same knobs as Qwen2VLImageProcessorPil."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE  # PIL resample code (3 = BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """What both sides of the resized image are multiples of."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "Qwen2VLImageParams":
        """From a checkpoint's preprocessor_config.json (already parsed).

        Accepts the old keys (`min_pixels` / `max_pixels` at the top level) and the new
        `size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`; as in transformers, top-level
        `min_pixels` / `max_pixels` win over `size`. The legacy `size = {"min_pixels": .., "max_pixels": ..}`
        is accepted too. A missing key takes Qwen2VLImageProcessorPil's default.
        """
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise UserError(f"preprocessor config 'size' must be an object, got {size!r}")
        min_pixels = size.get("shortest_edge", size.get("min_pixels"))
        max_pixels = size.get("longest_edge", size.get("max_pixels"))
        if cfg.get("min_pixels") is not None:
            min_pixels = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_pixels = cfg["max_pixels"]

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        return cls(
            min_pixels=int(_DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels),
            max_pixels=int(_DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels),
            patch_size=int(get("patch_size", _DEFAULT_PATCH_SIZE)),
            temporal_patch_size=int(get("temporal_patch_size", _DEFAULT_TEMPORAL_PATCH_SIZE)),
            merge_size=int(get("merge_size", _DEFAULT_MERGE_SIZE)),
            image_mean=triple(get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=triple(get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )


def preprocess_image(image: Image.Image, params: Qwen2VLImageParams) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w)).

    Equal to `Qwen2VLImageProcessorPil(...)(image)` for a single image. Raises UserError for an aspect ratio
    above 200 (what transformers' ValueError means for a user).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    try:
        new_h, new_w = smart_resize(height, width, factor=params.factor, min_pixels=params.min_pixels, max_pixels=params.max_pixels)
    except ValueError:
        ratio = max(height, width) / min(height, width)
        raise UserError(
            f"image of {width}x{height} pixels has an aspect ratio of {ratio:.1f}:1; "
            f"this model accepts at most {MAX_ASPECT_RATIO}:1 (crop or pad the image)"
        ) from None
    chw = rescale_normalize(resized_chw(image, new_h, new_w, params.resample, params.do_convert_rgb), params)
    pixel_values = patchify_merge_blocks(chw, params.patch_size, params.merge_size, params.temporal_patch_size)
    return pixel_values, (1, new_h // params.patch_size, new_w // params.patch_size)
