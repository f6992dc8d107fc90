"""Pixtral image preprocessing (Mistral 3 and Pixtral), torch-free (numpy + Pillow), composed from
mmexport.runtime.imageops.

A re-implementation of transformers' PIL-backend processor
`transformers.models.pixtral.image_processing_pil_pixtral.PixtralImageProcessorPil` (transformers 5.x) for one
image, as PixtralProcessor calls it (with `patch_size = vision patch_size * spatial_merge_size`):

1. convert to RGB, compositing any transparency onto white (`imageops.to_rgb`);
2. shrink (never enlarge) so that both sides fit `longest_edge` (floor of side / ratio), then round each side
   *up* to a multiple of the unit (patch_size * spatial_merge_size); resize the uint8 image with Pillow
   (BICUBIC by default);
3. rescale `uint8 -> float64 * rescale_factor -> float32`; normalize in float32 `(x - mean) / std`.

One image per call, so the batch padding of transformers' processor never applies (the vision tower crops it
away again: each image is its own size). The vision encoder takes the image as patches laid out on its grid,
`[grid_h, grid_w, 3 * patch * patch]` (each row a Conv2d patch, channel-major), so the graph knows the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, rescale_normalize, resized_chw, triple

_DEFAULT_LONGEST_EDGE = 1024
_DEFAULT_RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class PixtralImageParams(ParamsDict):
    """The knobs of PixtralImageProcessorPil, plus the model's patch size and spatial merge."""

    longest_edge: int
    patch_size: int  # the vision tower's patch
    merge_size: int  # Mistral 3's spatial_merge_size (1 for Pixtral)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def unit(self) -> int:
        """What both sides of the resized image are multiples of (PixtralProcessor's patch_size * spatial_merge_size)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, patch_size: int, merge_size: int) -> "PixtralImageParams":
        """From a checkpoint's preprocessor_config.json; the patch size and merge come from the model (the
        processor overrides the image processor's own patch_size with them)."""
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") or {"longest_edge": _DEFAULT_LONGEST_EDGE}
        if not isinstance(size, dict) or not (size.get("longest_edge") or (size.get("height") and size.get("width"))):
            raise UserError(f"preprocessor config 'size' must hold longest_edge, got {size!r}")
        if not size.get("longest_edge") and size["height"] != size["width"]:
            raise UserError(f"preprocessor config 'size' {size!r}: only a square bound is supported")
        longest = int(size.get("longest_edge") or size["height"])

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        return cls(
            longest_edge=longest,
            patch_size=int(patch_size),
            merge_size=int(merge_size),
            image_mean=triple(get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=triple(get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )


def resize_output_size(height: int, width: int, longest_edge: int, unit: int) -> tuple[int, int]:
    """transformers' pixtral get_resize_output_image_size: (height, width) after resizing."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height = int(math.floor(height / ratio))
        width = int(math.floor(width / ratio))
    return ((height - 1) // unit + 1) * unit, ((width - 1) // unit + 1) * unit


def patchify_grid(chw: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [H/p, W/p, C*p*p]: each patch as the Conv2d sees it (channel, row, column)."""
    c, h, w = chw.shape
    x = chw.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape(h // patch, w // patch, c * patch * patch), dtype=np.float32)


def unpatchify_grid(patches: np.ndarray, patch: int) -> np.ndarray:
    """The inverse of `patchify_grid`: [gh, gw, C*p*p] -> [C, gh*p, gw*p]."""
    gh, gw, d = patches.shape
    c = d // (patch * patch)
    return patches.reshape(gh, gw, c, patch, patch).transpose(2, 0, 3, 1, 4).reshape(c, gh * patch, gw * patch)


def preprocess_pixtral(image: Image.Image, params: PixtralImageParams) -> np.ndarray:
    """One image -> pixel values [3, H, W] float32, equal to PixtralImageProcessorPil's for that image alone."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_pixtral expects a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    new_h, new_w = resize_output_size(height, width, params.longest_edge, params.unit)
    return rescale_normalize(resized_chw(image, new_h, new_w, params.resample, params.do_convert_rgb), params)
