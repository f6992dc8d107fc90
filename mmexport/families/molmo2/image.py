"""Molmo2 image preprocessing, torch-free (numpy + Pillow), composed from mmexport.runtime.imageops.

A re-implementation of transformers' `Molmo2ImageProcessor` (transformers 5.x; it has only a torchvision
backend), step for step:

1. convert to RGB, compositing transparency onto white (`imageops.to_rgb`, what the backend applies to PIL);
2. choose the tiling (`select_tiling`: at most `max_crops` crops of `crop_size` px overlapping by
   `overlap_margins` patches) and the canvas it fills;
3. resize the image to the canvas and, separately, to one `crop_size` square (the low-resolution global view):
   bilinear in float without antialiasing (`imageops.resize_bilinear_torch`, bit-identical to the CPU kernel),
   rounded and clamped back to uint8, then the backend's fused rescale + normalize;
4. cut the canvas into overlapping crops (`unfold` with stride = crop - margins), patchify every crop (global
   view first) into `[1 + crops, patches_per_crop, patch * patch * 3]` (each patch row-major, channels last);
5. the pooling indices: which patches (flat index over all crops) each image token averages and attends over —
   `pool_h x pool_w` windows of the low-resolution grid, then of the high-resolution grid with every crop's
   overlap margins removed; -1 pads windows at the border.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UserError
from ...runtime.imageops import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ParamsDict,
    image_chw,
    rescale_normalize_fused,
    resize_uint8_via_float,
    triple,
)

__all__ = ["Molmo2ImageParams", "EncodedImage", "preprocess_image", "image_grid", "select_tiling"]


@dataclass(frozen=True)
class Molmo2ImageParams(ParamsDict):
    """Molmo2ImageProcessor's knobs (its class defaults where preprocessor_config.json is silent)."""

    crop_size: int = 378
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)
    patch_size: int = 14
    pooling_size: tuple[int, int] = (2, 2)
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Molmo2ImageParams":
        try:
            return cls(
                crop_size=int(d["crop_size"]), max_crops=int(d["max_crops"]),
                overlap_margins=tuple(int(v) for v in d["overlap_margins"]), patch_size=int(d["patch_size"]),
                pooling_size=tuple(int(v) for v in d["pooling_size"]),
                image_mean=triple(d["image_mean"], "image_mean"), image_std=triple(d["image_std"], "image_std"),
                do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                do_normalize=bool(d.get("do_normalize", True)), do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            )
        except KeyError as e:
            raise UserError(f"image preprocessing parameters lack the key {e.args[0]!r}") from None

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "Molmo2ImageParams":
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") or {"height": 378, "width": 378}
        if size.get("height") != size.get("width"):
            raise UserError(f"Molmo2 only supports a square `size`, got {size}")
        resample = cfg.get("resample", 2)
        if resample not in (2, None):
            raise UserError(f"Molmo2 preprocessing: only bilinear resampling (2) is supported, got {resample}")
        d = cls()
        return cls(
            crop_size=int(size["height"]), max_crops=int(cfg.get("max_crops", d.max_crops)),
            overlap_margins=tuple(int(v) for v in cfg.get("overlap_margins", d.overlap_margins)),
            patch_size=int(cfg.get("patch_size", d.patch_size)),
            pooling_size=tuple(int(v) for v in cfg.get("pooling_size", d.pooling_size)),
            image_mean=triple(cfg.get("image_mean", d.image_mean), "image_mean"),
            image_std=triple(cfg.get("image_std", d.image_std), "image_std"),
            do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)), do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
        )

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def window_size(self) -> int:
        return (self.crop_patches - sum(self.overlap_margins)) * self.patch_size


@dataclass
class EncodedImage:
    pixel_values: np.ndarray  # [1 + crops, patches_per_crop, patch*patch*3] float32 (global view first)
    pooling: np.ndarray  # [tokens, pool_h * pool_w] int64: flat patch indices over all crops, -1 = padding
    grid: tuple[int, int, int, int]  # (low-res rows, cols, high-res rows, cols) of image tokens

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.pooling.shape[0])


def select_tiling(height: int, width: int, patch_size: int, max_num_crops: int) -> tuple[int, int]:
    """transformers' `select_tiling` in float32: the (rows, cols) tiling that needs the least upscaling, or the
    least downscaling when every candidate downscales."""
    tilings = [(th, tw) for th, tw in itertools.product(range(1, max_num_crops + 1), repeat=2) if th * tw <= max_num_crops]
    tilings.sort(key=lambda x: (x[0] * x[1], x[0]))
    candidates = np.asarray(tilings, dtype=np.float32) * np.float32(patch_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = (candidates / np.asarray([height, width], dtype=np.float32)).min(-1)
    if np.all(scales < 1):
        return tilings[int(scales.argmax())]
    scales = np.where(scales < 1.0, np.float32(10e9), scales)
    return tilings[int(scales.argmin())]


def crop_geometry(height: int, width: int, p: Molmo2ImageParams) -> tuple[int, int, int, int]:
    """(tiling_h, tiling_w, canvas_height, canvas_width) — transformers' `compute_crop_geometry`."""
    margin = sum(p.overlap_margins) * p.patch_size
    th, tw = select_tiling(height - margin, width - margin, p.window_size, p.max_crops)
    return th, tw, th * p.window_size + margin, tw * p.window_size + margin


def arange_for_pooling(index_grid: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, int, int]:
    """A [h, w] patch-index grid grouped into pooling windows [rows * cols, pool_h * pool_w], padded with -1
    (half before, the odd one after), and the pooled grid's (rows, cols)."""
    ph = pool_h * (-(-index_grid.shape[0] // pool_h)) - index_grid.shape[0]
    pw = pool_w * (-(-index_grid.shape[1] // pool_w)) - index_grid.shape[1]
    g = np.pad(index_grid, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2)), constant_values=-1)
    rows, cols = g.shape[0] // pool_h, g.shape[1] // pool_w
    return g.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w), rows, cols


def image_grid(height: int, width: int, p: Molmo2ImageParams) -> tuple[tuple[int, int, int, int], int]:
    """The (low-res rows, cols, high-res rows, cols) token grid and the crop count (global view included) of an
    image of this size: the processor's `get_image_grid_and_crops`."""
    th, tw, ch, cw = crop_geometry(height, width, p)
    ph, pw = p.pooling_size
    n = p.crop_patches
    return (-(-n // ph), -(-n // pw), -(-(ch // p.patch_size) // ph), -(-(cw // p.patch_size) // pw)), th * tw + 1


def _patchify(crops: np.ndarray, patch: int) -> np.ndarray:
    """[N, C, S, S] -> [N, (S/p)^2, p*p*C]: patches row-major, each patch's pixels (row, col, channel)."""
    n, c, s, _ = crops.shape
    g = s // patch
    x = crops.reshape(n, c, g, patch, g, patch).transpose(0, 2, 4, 3, 5, 1)  # n, gy, gx, py, px, c
    return np.ascontiguousarray(x.reshape(n, g * g, patch * patch * c), dtype=np.float32)


def preprocess_image(image, p: Molmo2ImageParams) -> EncodedImage:
    chw = image_chw(image, p.do_convert_rgb)
    if chw.shape[0] != 3:
        raise UserError(f"Molmo2 preprocessing needs an RGB image, got {chw.shape[0]} channels; enable do_convert_rgb")
    height, width = chw.shape[1:]
    th, tw, ch, cw = crop_geometry(height, width, p)
    s, win, n = p.crop_size, p.window_size, p.crop_patches
    canvas = rescale_normalize_fused(resize_uint8_via_float(chw, ch, cw), p)
    crops = np.stack([canvas[:, i * win:i * win + s, j * win:j * win + s] for i in range(th) for j in range(tw)])
    glob = rescale_normalize_fused(resize_uint8_via_float(chw, s, s), p)[None]
    pixel_values = _patchify(np.concatenate([glob, crops]), p.patch_size)

    left, right = p.overlap_margins
    idx = np.arange(th * tw * n * n, dtype=np.int64).reshape(th, tw, n, n)
    if left:
        idx[1:, :, :left, :] = -1
        idx[:, 1:, :, :left] = -1
    if right:
        idx[:-1, :, -right:, :] = -1
        idx[:, :-1, :, -right:] = -1
    idx = idx.transpose(0, 2, 1, 3).reshape(-1)
    idx = idx[idx >= 0].reshape(ch // p.patch_size, cw // p.patch_size)
    pool_h, pool_w = p.pooling_size
    high, hr, hc = arange_for_pooling(idx, pool_h, pool_w)
    low, lr, lc = arange_for_pooling(np.arange(n * n, dtype=np.int64).reshape(n, n), pool_h, pool_w)
    high = np.where(high >= 0, high + n * n, -1)
    return EncodedImage(pixel_values, np.concatenate([low, high]).astype(np.int64), (lr, lc, hr, hc))
