"""Janus image preprocessing, torch-free (numpy + Pillow), composed from mmexport.runtime.imageops.

A re-implementation of transformers' PIL-backend processor
`transformers.models.janus.image_processing_pil_janus.JanusImageProcessorPil` (transformers 5.x), step for step,
so that the result is bit-for-bit the same pixel_values:

1. (only with do_convert_rgb) convert to RGB, compositing any transparency onto white (`imageops.to_rgb`);
2. resize the *uint8* image with Pillow (BICUBIC by default) so that its longest edge becomes `size` (384 for the
   released checkpoints): each side is `max(round(side * size / longest), min_size)`, Python's `round`;
3. pad to a `size` x `size` square, centred (the extra row/column at the bottom/right), still in uint8, with the
   background colour `int(mean * 255)` per channel — so the padding normalizes to about 0, not to -mean/std;
4. rescale: `uint8 -> float64 * rescale_factor -> float32`; normalize in float32: `(x - mean) / std`.

The vision tower takes a fixed `[3, size, size]` image (its position embedding is a fixed grid).

transformers' processor does not convert to RGB unless the checkpoint's preprocessor_config.json says
`do_convert_rgb` (Janus-Pro's does not), so it fails on grayscale or RGBA images; here such an image is converted
(`imageops.to_rgb`) instead of refused. RGB images, the common case, take exactly transformers' path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, rescale_normalize, resized_chw, triple

__all__ = ["JanusImageParams", "janus_resize_size", "preprocess_image"]

# JanusImageProcessorPil's class defaults.
_DEFAULT_SIZE = 384
_DEFAULT_MIN_SIZE = 14
_DEFAULT_RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class JanusImageParams(ParamsDict):
    """Everything `preprocess_image` needs; the same knobs as JanusImageProcessorPil."""

    size: int  # the square side the image is resized (longest edge) and padded to
    min_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE
    do_resize: bool = True
    do_pad: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = False

    optional = ParamsDict.optional + ("do_resize", "do_pad")

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of every processed picture; 0 when it depends on the image (resize or padding off)."""
        return (self.size, self.size) if self.do_resize and self.do_pad else (0, 0)

    @property
    def background_color(self) -> tuple[int, int, int]:
        """The padding colour, as JanusImageProcessorPil derives it from image_mean (truncated, not rounded)."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "JanusImageParams":
        """From a checkpoint's preprocessor_config.json (already parsed); a missing key takes
        JanusImageProcessorPil's default. `size` is {"height": n, "width": n} (square only, as transformers
        insists), a bare int, or the original checkpoints' `image_size`."""
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        size = get("size", get("image_size", _DEFAULT_SIZE))
        if isinstance(size, dict):
            h, w = size.get("height"), size.get("width")
            if h is None or w is None or int(h) != int(w):
                raise UserError(f"preprocessor config 'size' must be a square {{height: n, width: n}}, got {size!r}")
            size = h
        return cls(
            size=int(size),
            min_size=int(get("min_size", _DEFAULT_MIN_SIZE)),
            image_mean=triple(get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=triple(get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_resize=bool(get("do_resize", True)),
            do_pad=bool(get("do_pad", True)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", False)),
        )


def janus_resize_size(height: int, width: int, size: int, min_size: int) -> tuple[int, int]:
    """(height, width) after JanusImageProcessorPil.resize: the longest edge becomes `size`, the other side
    keeps the aspect ratio (Python's round, half to even), neither below `min_size`."""
    delta = size / max(height, width)
    return max(round(height * delta), min_size), max(round(width * delta), min_size)


def pad_to_square(chw: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """JanusImageProcessorPil.pad_to_square: centred on a square of the longest side filled with `color`."""
    c, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.empty((c, side, side), dtype=chw.dtype)
    out[:] = np.asarray(color, dtype=chw.dtype)[:, None, None]
    if w > h:
        top = (side - h) // 2
        out[:, top:top + h, :] = chw
    else:
        left = (side - w) // 2
        out[:, :, left:left + w] = chw
    return out


def preprocess_image(image: Image.Image, params: JanusImageParams) -> np.ndarray:
    """One image -> pixel_values float32 [3, size, size]; equal to `JanusImageProcessorPil(...)(image)` for a
    single RGB image (and for any image when do_convert_rgb is set)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    # transformers keeps a non-RGB image as it is without do_convert_rgb and then fails on it: convert it instead
    convert = params.do_convert_rgb or image.mode != "RGB"
    if params.do_resize:
        new_h, new_w = janus_resize_size(height, width, params.size, params.min_size)
        chw = resized_chw(image, new_h, new_w, params.resample, convert)
    else:
        from ...runtime.imageops import image_chw

        chw = image_chw(image, convert)
    if params.do_pad:
        chw = pad_to_square(chw, params.background_color)
    chw = rescale_normalize(chw, params)
    if chw.shape[1:] != (params.size, params.size):
        raise UserError(f"image of {width}x{height} pixels preprocesses to {chw.shape[2]}x{chw.shape[1]}, but the vision "
                        f"tower takes {params.size}x{params.size} (the checkpoint's preprocessor disables resizing or padding)")
    return np.ascontiguousarray(chw, dtype=np.float32)
