"""Fuyu image preprocessing, torch-free (numpy + Pillow), composed from mmexport.runtime.imageops.

A re-implementation of what `FuyuProcessor` does with transformers' Fuyu image processors (transformers 5.x):
the image processor (`FuyuImageProcessor`, torchvision backend; `FuyuImageProcessorPil` gives the same padded
pixels) and the processor's own crop + patchify (`FuyuProcessor._process_images`):

1. convert to RGB (`imageops.to_rgb`);
2. resize only an image larger than `size` (height x width, 1080 x 1920 for fuyu-8b): scale by
   min(H / h, W / w), sides truncated to int, antialiased bilinear on the uint8 image rounded as torchvision's
   resize rounds it (int16 fixed-point weights; `imageops.resize_bilinear_aa_uint8`). transformers' PIL class
   resizes with Pillow (22-bit weights), which differs by one uint8 level in ~0.5% of the pixels; the
   torchvision class is the one FuyuProcessor runs with in transformers 5.x (see reference.py);
3. pad bottom / right to `size` with `padding_value` (1.0, in the uint8 range: it becomes (1/255 - 0.5) / 0.5);
4. rescale (`uint8 -> float64 * rescale_factor -> float32`), normalize in float32;
5. crop to the resized size rounded up to whole patches (the padding fills the last row / column of patches);
6. patchify: patches in row-major order, each flattened as (patch_h, patch_w, channel) -> [rows * cols, ph*pw*C].

The prompt then takes, per row of patches, `cols` |SPEAKER| tokens and one |NEWLINE| (runtime.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import ParamsDict, image_chw, pad, rescale_normalize, resize_bilinear_aa_uint8, to_rgb, triple

__all__ = ["FuyuImageParams", "FuyuEncodedImage", "preprocess_fuyu", "resized_size"]


@dataclass(frozen=True)
class FuyuImageParams(ParamsDict):
    """The knobs of FuyuImageProcessor (its class defaults unless preprocessor_config.json says otherwise)."""

    height: int = 1080  # size: the canvas the image is fit into and padded to
    width: int = 1920
    patch_height: int = 30
    patch_width: int = 30
    padding_value: float = 1.0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_resize: bool = True

    optional = ParamsDict.optional + ("do_resize",)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_height * self.patch_width

    @property
    def max_patches(self) -> int:
        return math.ceil(self.height / self.patch_height) * math.ceil(self.width / self.patch_width)

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "FuyuImageParams":
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") or {"height": 1080, "width": 1920}
        patch = cfg.get("patch_size") or {"height": 30, "width": 30}
        if not (isinstance(size, dict) and {"height", "width"} <= set(size)):
            raise UserError(f"Fuyu preprocessor config 'size' must be {{height, width}}, got {size!r}")
        if not (isinstance(patch, dict) and {"height", "width"} <= set(patch)):
            raise UserError(f"Fuyu preprocessor config 'patch_size' must be {{height, width}}, got {patch!r}")
        if cfg.get("do_pad", True) is False or cfg.get("padding_mode", "constant") != "constant":
            raise UserError("Fuyu preprocessing without constant padding (do_pad=false or another padding_mode) is not supported")
        return cls(
            height=int(size["height"]), width=int(size["width"]),
            patch_height=int(patch["height"]), patch_width=int(patch["width"]),
            padding_value=float(cfg.get("padding_value", 1.0)),
            image_mean=triple(cfg.get("image_mean", 0.5), "image_mean"),
            image_std=triple(cfg.get("image_std", 0.5), "image_std"),
            resample=int(cfg.get("resample", 2)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            do_resize=bool(cfg.get("do_resize", True)),
        )


@dataclass
class FuyuEncodedImage:
    pixel_values: np.ndarray  # [rows * cols, patch_h * patch_w * 3] float32, row-major patches
    rows: int
    cols: int

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols


def resized_size(height: int, width: int, p: FuyuImageParams) -> tuple[int, int]:
    """FuyuImageProcessor.resize: unchanged when it fits `size`, else scaled down keeping the aspect ratio."""
    if not p.do_resize or (width <= p.width and height <= p.height):
        return height, width
    scale = min(p.height / height, p.width / width)
    return int(height * scale), int(width * scale)


def padded_pixels(image: Image.Image, p: FuyuImageParams) -> tuple[np.ndarray, int, int]:
    """Steps 1-4: the normalized [3, H, W] canvas (what the image processor returns as `images`) and the
    unpadded (resized) height and width."""
    image = to_rgb(image)
    h, w = resized_size(image.height, image.width, p)
    chw = image_chw(image)
    if (h, w) != (image.height, image.width):
        if p.resample != 2:
            raise UserError(f"Fuyu preprocessing supports the bilinear resample (2), not {p.resample}")
        chw = np.moveaxis(resize_bilinear_aa_uint8(np.moveaxis(chw, 0, -1), h, w, "torch"), -1, 0)
    if h > p.height or w > p.width:  # do_resize=false and a larger image: the processor cannot pad it
        raise UserError(f"image of {image.width}x{image.height} pixels exceeds Fuyu's {p.width}x{p.height} canvas")
    canvas = pad(chw, p.height, p.width, value=p.padding_value)
    return rescale_normalize(canvas, p).astype(np.float32), h, w


def preprocess_fuyu(image: Image.Image, p: FuyuImageParams) -> FuyuEncodedImage:
    canvas, h, w = padded_pixels(image, p)
    ph, pw = p.patch_height, p.patch_width
    new_h = min(p.height, math.ceil(h / ph) * ph)
    new_w = min(p.width, math.ceil(w / pw) * pw)
    if new_h % ph or new_w % pw:
        raise UserError(f"Fuyu's canvas {p.height}x{p.width} is not whole {ph}x{pw} patches")
    rows, cols = new_h // ph, new_w // pw
    crop = canvas[:, :new_h, :new_w]
    patches = crop.reshape(3, rows, ph, cols, pw).transpose(1, 3, 2, 4, 0).reshape(rows * cols, ph * pw * 3)
    return FuyuEncodedImage(np.ascontiguousarray(patches, dtype=np.float32), rows, cols)

