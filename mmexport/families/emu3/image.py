"""Emu3 image preprocessing, torch-free (numpy + Pillow): transformers' `Emu3ImageProcessor` (numpy/PIL, the
only Emu3 image processor) for one image, step for step:

1. convert to RGB (`imageops.to_rgb`);
2. `smart_resize` to sides divisible by `spatial_factor` (8: the VQ-VAE's downsampling) with the pixel count in
   [min_pixels, max_pixels], and resize the uint8 image with Pillow (BICUBIC);
3. rescale (`uint8 -> float64 * rescale_factor -> float32`), normalize in float32 -> [3, H, W].

(The processor pads a batch of images to the largest; one image per call needs no padding.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UserError
from ...runtime.imageops import (MAX_ASPECT_RATIO, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, image_chw, rescale_normalize,
                                 resized_chw, smart_resize, triple)

__all__ = ["Emu3ImageParams", "Emu3EncodedImage", "preprocess_emu3"]


@dataclass(frozen=True)
class Emu3ImageParams(ParamsDict):
    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    spatial_factor: int = 8
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_resize: bool = True

    optional = ParamsDict.optional + ("do_resize",)

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "Emu3ImageParams":
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        d = cls()
        return cls(
            min_pixels=int(cfg.get("min_pixels", d.min_pixels)), max_pixels=int(cfg.get("max_pixels", d.max_pixels)),
            spatial_factor=int(cfg.get("spatial_factor", d.spatial_factor)),
            image_mean=triple(cfg.get("image_mean") or d.image_mean, "image_mean"),
            image_std=triple(cfg.get("image_std") or d.image_std, "image_std"),
            resample=int(cfg.get("resample", d.resample)), do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), do_normalize=bool(cfg.get("do_normalize", True)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)), do_resize=bool(cfg.get("do_resize", True)),
        )


@dataclass
class Emu3EncodedImage:
    pixel_values: np.ndarray  # [3, H, W] float32

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixel_values.shape[1]), int(self.pixel_values.shape[2])


def preprocess_emu3(image, p: Emu3ImageParams) -> Emu3EncodedImage:
    if not p.do_resize:
        chw = image_chw(image, p.do_convert_rgb)
    else:
        try:
            h, w = smart_resize(image.height, image.width, p.spatial_factor, p.min_pixels, p.max_pixels)
        except ValueError:
            raise UserError(f"image of {image.width}x{image.height} pixels: this model accepts an aspect ratio of at most "
                            f"{MAX_ASPECT_RATIO}:1 (crop or pad the image)") from None
        chw = resized_chw(image, h, w, p.resample, p.do_convert_rgb)
    return Emu3EncodedImage(np.ascontiguousarray(rescale_normalize(chw, p), dtype=np.float32))
