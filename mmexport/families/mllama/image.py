"""Torch-free Llama 3.2 Vision (mllama) host-side preprocessing (numpy + Pillow only).

Image: a step-for-step re-implementation of transformers' PIL-backend processor
`transformers.models.mllama.image_processing_pil_mllama.MllamaImageProcessorPil` (transformers 5.x), bit-for-bit
the same pixel_values, aspect_ratio_ids, aspect_ratio_mask and num_tiles for one image:

1. convert to RGB, compositing any transparency onto white (`imageops.to_rgb`);
2. choose the tiled canvas: among all (rows, cols) tile grids with rows * cols <= max_image_tiles
   (`supported_aspect_ratios`), the one needing the smallest upscale, else the smallest downscale, ties broken
   by the smallest area (`get_optimal_tiled_canvas`);
3. resize the *uint8* image with Pillow (BILINEAR by default) to fit that canvas keeping its aspect ratio, each
   side clamped to [tile_size, canvas side] first (`get_image_size_fit_to_canvas`);
4. pad bottom / right with 0 to the canvas, still in uint8 -- so padding becomes (0 - mean) / std, not 0;
5. rescale (`uint8 -> float64 * rescale_factor -> float32`), then normalize in float32: `(x - mean) / std`;
6. split into tiles in row-major order: [rows * cols, C, tile, tile];
7. zero-pad the tile axis to max_image_tiles. aspect_ratio_id is the 1-based index of (rows, cols) in
   `supported_aspect_ratios(max_image_tiles)` (0 is reserved for batch padding); aspect_ratio_mask is 1 for the
   first rows * cols tiles (and always for tile 0).

Text: `cross_attention_token_mask` and `dense_cross_attention_mask` are the torch-free twins of
`processing_mllama.get_cross_attention_token_mask` / `convert_sparse_cross_attention_mask_to_dense` (for a batch
of one sequence).

Nothing here may import torch or transformers (the runtime is torch-free).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import ParamsDict, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, pad, rescale_normalize, resized_chw, split_tiles, triple

__all__ = [
    "MllamaImageParams",
    "MllamaEncodedImage",
    "supported_aspect_ratios",
    "get_optimal_tiled_canvas",
    "get_image_size_fit_to_canvas",
    "preprocess_mllama",
    "cross_attention_token_mask",
    "dense_cross_attention_mask",
]

# MllamaImageProcessorPil's class defaults are IMAGENET_STANDARD_MEAN / _STD (the released Llama 3.2 Vision
# checkpoints override them with the OpenAI CLIP values in preprocessor_config.json).

# MllamaImageProcessorPil's other class defaults.
_DEFAULT_TILE_SIZE = 224
_DEFAULT_MAX_IMAGE_TILES = 4
_DEFAULT_RESAMPLE = 2  # PIL.Image.Resampling.BILINEAR


@lru_cache(maxsize=16)
def _supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple(
        (a, b)
        for a in range(1, max_image_tiles + 1)
        for b in range(1, max_image_tiles + 1)
        if a * b <= max_image_tiles
    )


def supported_aspect_ratios(max_image_tiles: int) -> list[tuple[int, int]]:
    """All tile grids with at most `max_image_tiles` tiles, in transformers' order.

    `get_all_supported_aspect_ratios(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]`.
    transformers documents the pairs as (width, height) but uses them as (rows, cols) = (height, width) in tiles
    everywhere (canvas choice, aspect_ratio_id); so do we. The model's vision_config.supported_aspect_ratios is
    the same list.
    """
    if max_image_tiles < 1:
        raise UserError(f"max_image_tiles must be a positive integer, got {max_image_tiles}")
    return list(_supported_aspect_ratios(int(max_image_tiles)))


@lru_cache(maxsize=256)
def get_optimal_tiled_canvas(
    image_height: int, image_width: int, max_image_tiles: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) of the tiled canvas transformers picks for an image (`get_optimal_tiled_canvas`).

    For each grid, the scale is the smaller of canvas_h / image_h and canvas_w / image_w. The smallest scale >= 1
    wins (least upscaling); with none, the largest scale < 1 (least downscaling); among equal scales the canvas of
    the smallest area (the first one in grid order on a tie). Float64 division, exact equality, as numpy does.
    """
    canvases = [(a * tile_size, b * tile_size) for a, b in _supported_aspect_ratios(max_image_tiles)]
    scales = []
    for target_h, target_w in canvases:
        scale_h = target_h / image_height
        scale_w = target_w / image_width
        scales.append(scale_h if scale_w > scale_h else scale_w)
    upscaling = [s for s in scales if s >= 1]
    selected = min(upscaling) if upscaling else max(s for s in scales if s < 1)
    chosen = [c for c, s in zip(canvases, scales) if s == selected]
    return min(chosen, key=lambda c: c[0] * c[1])  # min() keeps the first of equal areas, like np.argmin


def get_image_size_fit_to_canvas(
    image_height: int, image_width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) the image is resized to inside its canvas (transformers' `get_image_size_fit_to_canvas`).

    Each side is first clamped to [tile_size, canvas side]; the side with the smaller scale takes its target and the
    other follows the aspect ratio, floored, at least 1 and at most its own target.
    """
    target_width = min(max(image_width, tile_size), canvas_width)  # np.clip
    target_height = min(max(image_height, tile_size), canvas_height)
    scale_h = target_height / image_height
    scale_w = target_width / image_width
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.floor(image_height * scale_w) or 1, target_height)
    else:
        new_height = target_height
        new_width = min(math.floor(image_width * scale_h) or 1, target_width)
    return new_height, new_width


@dataclass(frozen=True)
class MllamaImageParams(ParamsDict):
    """Everything `preprocess_mllama` needs; the knobs of MllamaImageProcessorPil.

    tile_size is the processor's size["height"] == size["width"] (560 for the released checkpoints). do_resize
    and do_pad are not knobs: the processor refuses False for either, and so does `from_preprocessor_config`.
    """

    tile_size: int = _DEFAULT_TILE_SIZE
    max_image_tiles: int = _DEFAULT_MAX_IMAGE_TILES
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    resample: int = _DEFAULT_RESAMPLE  # PIL resample code (2 = BILINEAR)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if int(self.tile_size) < 1:
            raise UserError(f"mllama tile size must be a positive integer, got {self.tile_size}")
        if int(self.max_image_tiles) < 1:
            raise UserError(f"max_image_tiles must be a positive integer, got {self.max_image_tiles}")

    @property
    def size(self) -> dict[str, int]:
        """As the processor's `size`: {"height": tile_size, "width": tile_size}."""
        return {"height": self.tile_size, "width": self.tile_size}

    @property
    def supported_aspect_ratios(self) -> list[tuple[int, int]]:
        """(rows, cols) tile grids; aspect_ratio_id k > 0 means grid k - 1 of this list."""
        return supported_aspect_ratios(self.max_image_tiles)

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "MllamaImageParams":
        """From a checkpoint's preprocessor_config.json (already parsed), as MllamaImageProcessor(Pil) saves it.

        A missing (or null) key takes MllamaImageProcessorPil's class default, as transformers does. `size` may be
        {"height": h, "width": w} (h == w required, as in transformers) or a bare int. do_resize / do_pad must not
        be false (transformers raises for either).
        """
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        size = get("size", {"height": _DEFAULT_TILE_SIZE, "width": _DEFAULT_TILE_SIZE})
        if isinstance(size, bool) or not isinstance(size, (int, dict)):
            raise UserError(f"preprocessor config 'size' must be an object with height and width, got {size!r}")
        if isinstance(size, int):
            height = width = size
        else:
            height, width = size.get("height"), size.get("width")
            if not height or not width:
                raise UserError(f"mllama preprocessor config 'size' must have 'height' and 'width', got {size!r}")
        if int(height) != int(width):
            raise UserError(f"mllama preprocessor config 'size' must be square, got {size!r}")
        for flag in ("do_resize", "do_pad"):
            if not get(flag, True):
                raise UserError(f"mllama preprocessing requires {flag}=true (transformers does not support false)")
        max_tiles = get("max_image_tiles", _DEFAULT_MAX_IMAGE_TILES)
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles <= 0:
            raise UserError(f"mllama max_image_tiles must be a positive integer, got {max_tiles!r}")
        return cls(
            tile_size=int(height),
            max_image_tiles=int(max_tiles),
            image_mean=triple(get("image_mean", IMAGENET_STANDARD_MEAN), "image_mean"),
            image_std=triple(get("image_std", IMAGENET_STANDARD_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )


@dataclass
class MllamaEncodedImage:
    """One preprocessed image, i.e. transformers' outputs [0, 0] for a batch of one sample with one image."""

    pixel_values: np.ndarray  # [max_image_tiles, C, tile, tile] float32 (C = 3 after RGB conversion); unused tiles 0
    aspect_ratio_id: int  # 1-based index of (rows, cols) in supported_aspect_ratios(max_image_tiles)
    aspect_ratio_mask: np.ndarray  # [max_image_tiles] int64; 1 for the rows * cols real tiles
    num_tiles: int  # rows * cols

    @property
    def aspect_ratio(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid; the model's vision_config.supported_aspect_ratios[aspect_ratio_id - 1]."""
        max_tiles = int(self.aspect_ratio_mask.shape[0])
        return supported_aspect_ratios(max_tiles)[self.aspect_ratio_id - 1]


def preprocess_mllama(image: Image.Image, params: MllamaImageParams) -> MllamaEncodedImage:
    """One image -> MllamaEncodedImage, equal to `MllamaImageProcessorPil(...)(image)` for a single image.

    transformers' batch arrays for one image are pixel_values[None, None], aspect_ratio_ids [[id]],
    aspect_ratio_mask[None, None] and num_tiles [[n]].
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_mllama expects a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")

    tile = int(params.tile_size)
    max_tiles = int(params.max_image_tiles)
    canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, max_tiles, tile)
    rows, cols = canvas_h // tile, canvas_w // tile
    new_h, new_w = get_image_size_fit_to_canvas(height, width, canvas_h, canvas_w, tile)

    chw = resized_chw(image, new_h, new_w, params.resample, params.do_convert_rgb)
    # MllamaImageProcessorPil.pad: bottom / right, constant 0, before rescale and normalize (dtype unchanged).
    chw = rescale_normalize(pad(chw, canvas_h, canvas_w), params)
    tiles = split_tiles(chw, tile, tile)  # split_to_tiles_np: row-major tile order
    channels = chw.shape[0]

    num_tiles = rows * cols
    pixel_values = np.zeros((max_tiles, channels, tile, tile), dtype=np.float32)  # pack_images
    pixel_values[:num_tiles] = tiles
    aspect_ratio_mask = np.zeros((max_tiles,), dtype=np.int64)  # build_aspect_ratio_mask_np
    aspect_ratio_mask[0] = 1
    aspect_ratio_mask[:num_tiles] = 1
    aspect_ratio_id = _supported_aspect_ratios(max_tiles).index((rows, cols)) + 1  # convert_aspect_ratios_to_ids_np
    return MllamaEncodedImage(
        pixel_values=pixel_values,
        aspect_ratio_id=aspect_ratio_id,
        aspect_ratio_mask=aspect_ratio_mask,
        num_tiles=num_tiles,
    )


def cross_attention_token_mask(input_ids: Sequence[int], image_token_id: int) -> list[list[int]]:
    """Which text positions each image is visible to, as [start, end) pairs (`get_cross_attention_token_mask`).

    One pair per `<|image|>` token, in order. A single image: [[pos, -1]] (-1 = to the end). Several: each image
    until the next image token, the last to len(input_ids); a run of consecutive image tokens all share the end of
    the run's last image (so they all see the text that follows). No image token: [].
    """
    locations = [i for i, token in enumerate(input_ids) if int(token) == image_token_id]
    if not locations:
        return []
    if len(locations) == 1:
        return [[locations[0], -1]]
    masks = [[a, b] for a, b in zip(locations[:-1], locations[1:])]
    masks.append([locations[-1], len(input_ids)])
    last_end = masks[-1][1]
    for mask in masks[::-1]:
        if mask[0] == mask[1] - 1:
            mask[1] = last_end
        last_end = mask[1]
    return masks


def dense_cross_attention_mask(
    token_mask: Sequence[Sequence[int]], num_tiles: Sequence[int], max_tiles: int, length: int
) -> np.ndarray:
    """The model's cross_attention_mask for ONE sequence: int64 [length, num_images, max_tiles].

    transformers' `convert_sparse_cross_attention_mask_to_dense([token_mask], [num_tiles], max_tiles, length)[0]`
    (batch of one; add the batch axis with `[None]`). num_images = len(token_mask); entry [t, i, k] is 1 when text
    position t sees tile k of image i (k < num_tiles[i]). An end of -1 means `length`; ends past `length` are cut.
    Images without a num_tiles entry (zip stops at the shorter list) stay all 0, as in transformers.
    """
    out = np.zeros((int(length), len(token_mask), int(max_tiles)), dtype=np.int64)
    for index, (locations, tiles) in enumerate(zip(token_mask, num_tiles)):
        if len(locations) == 2:
            start, end = locations
            end = min(end, length)
            if end == -1:
                end = length
            out[start:end, index, :tiles] = 1
    return out
