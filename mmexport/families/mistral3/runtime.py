"""Mistral 3's host-side logic, torch-free: Pixtral preprocessing (image.py), the vision tower's 2D rotary
tables, PixtralProcessor's prompt layout, and plain 1D positions for the Mistral decoder.

Prompt (PixtralProcessor.replace_image_token): each image's `[IMG]` placeholder becomes its token grid row by
row, `[IMG]` x (grid_w / merge) then `[IMG_BREAK]`, the last `[IMG_BREAK]` replaced by `[IMG_END]`. Only the
`[IMG]` tokens take image embeddings (row-major over the merged grid); the break and end tokens are ordinary
text tokens.

Rotary (PixtralVisionRotaryEmbedding, axial): frequencies theta^(-2i/head_dim) split alternately between
rows and columns; a patch at (r, c) gets angles [r * f_even, c * f_odd] repeated twice over the head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...runtime.methods import EmbeddingMerge
from .image import PixtralImageParams, patchify_grid, preprocess_pixtral, unpatchify_grid


def rotary_tables(grid_h: int, grid_w: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [grid_h, grid_w, head_dim] float32 of Pixtral's axial 2D rotary for one image."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(np.float32)
    f_h, f_w = inv[0::2], inv[1::2]  # rows take the even frequencies, columns the odd ones
    rows = np.arange(grid_h, dtype=np.float32)[:, None, None] * f_h  # [gh, 1, hd/4]
    cols = np.arange(grid_w, dtype=np.float32)[None, :, None] * f_w  # [1, gw, hd/4]
    hw = np.concatenate(np.broadcast_arrays(rows, cols), axis=-1)  # [gh, gw, hd/2]
    full = np.concatenate([hw, hw], axis=-1).astype(np.float32)
    return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def image_placeholder(rows: int, cols: int, image_token: str, break_token: str, end_token: str) -> str:
    """PixtralProcessor's replacement text for one image of rows x cols merged tokens."""
    text = (image_token * cols + break_token) * rows
    return text[: -len(break_token)] + end_token


@dataclass
class PixtralImage:
    pixels: np.ndarray  # [3, H, W] float32, as transformers' processor makes them
    patch: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.pixels.shape[1] // self.patch, self.pixels.shape[2] // self.patch

    @property
    def pixel_values(self) -> np.ndarray:
        return patchify_grid(self.pixels, self.patch)


class Mistral3Runtime(EmbeddingMerge):
    """The Mistral 3 hooks of the generic pipeline (Method A, see methods.py)."""

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = PixtralImageParams.from_dict(model_cfg["image"])
        self.vision = model_cfg["vision"]
        self.tokens = model_cfg["tokens"]
        self.image_token_id = int(self.tokens["image_token_id"])
        names = model_cfg["token_strings"]
        self.image_token, self.break_token, self.end_token = names["image"], names["image_break"], names["image_end"]
        self.merge = int(self.vision["spatial_merge_size"])
        self.patch = int(self.vision["patch_size"])

    def preprocess(self, image) -> PixtralImage:
        return PixtralImage(preprocess_pixtral(image, self.image_params), self.patch)

    def image_token_count(self, img: PixtralImage) -> int:
        gh, gw = img.grid
        return (gh // self.merge) * (gw // self.merge)

    def image_text(self, img: PixtralImage) -> str:
        gh, gw = img.grid
        return image_placeholder(gh // self.merge, gw // self.merge, self.image_token, self.break_token, self.end_token)

    def vision_feeds(self, img: PixtralImage) -> dict[str, np.ndarray]:
        gh, gw = img.grid
        cos, sin = rotary_tables(gh, gw, int(self.vision["head_dim"]), float(self.vision["rope_theta"]))
        return {"pixel_values": img.pixel_values, "rotary_cos": cos, "rotary_sin": sin}

    def reference_pixels(self, img: PixtralImage) -> np.ndarray:
        return unpatchify_grid(img.pixel_values, self.patch)  # what the graph is fed, laid out as [3, H, W]

    def vision_limits(self, spec, img: PixtralImage) -> str:
        d = spec.dims["grid_h"]
        side = d.max * self.patch
        return (f"it resizes to {img.pixels.shape[2]}x{img.pixels.shape[1]} pixels; this build's vision encoder takes sides "
                f"of {d.min * self.patch} to {side} pixels (the checkpoint's longest_edge {self.image_params.longest_edge})")

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[PixtralImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)[None, :] + delta
