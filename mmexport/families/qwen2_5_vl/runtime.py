"""Qwen2.5-VL's host-side logic, torch-free. Preprocessing, placeholder expansion and M-RoPE positions are
Qwen2-VL's (transformers 5.x uses Qwen2VLImageProcessor for qwen2_5_vl, and Qwen2.5-VL's get_rope_index
gives still images the same positions); what is new is the vision tower's window layout.

Window attention (transformers' Qwen2_5_VisionTransformerPretrainedModel): the image's merge units (merge x
merge patches, one LLM token each) are cut into windows of `window` x `window` units (window = window_size //
spatial_merge_size // patch_size; the bottom and right windows may be partial), and the patch sequence is
reordered window by window, row-major over the windows and inside each (`get_vision_window_index`). Blocks
in `fullatt_block_indexes` attend over the whole image, the others within their window; the merger's tokens
go back to raster order (`reverse_indices`).

The exported vision graph takes the patches (and their rotary tables) in that window order, plus two index
tables built here, so it needs no data-dependent split:
  window_index [num_windows, window_patches]  the row held by each slot of each window, -1 = padding: every
                                              window is padded to window^2 whole merge units, so the
                                              windowed blocks are one batched attention with a per-key mask
  patch_slots  [num_patches]                  each row's slot in the flattened windows (the way back)
Only the windowed attention sees padding; projections, MLPs and full attention run on the real patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..qwen2_vl.runtime import Qwen2VLRuntime, vision_rotary_tables


def window_order(grid_h: int, grid_w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' get_vision_window_index for one still image: the merge units in window order [U] (int64)
    and the windows' cumulative lengths in patches [num_windows + 1] (no empty windows)."""
    lh, lw = grid_h // merge, grid_w // merge
    nh, nw = -(-lh // window), -(-lw // window)
    units = np.full((nh * window, nw * window), -1, dtype=np.int64)
    units[:lh, :lw] = np.arange(lh * lw).reshape(lh, lw)
    windows = units.reshape(nh, window, nw, window).transpose(0, 2, 1, 3).reshape(nh * nw, window * window)
    cu = np.concatenate([[0], np.cumsum((windows >= 0).sum(-1))]) * merge * merge
    return windows[windows >= 0], cu.astype(np.int64)


def count_windows(grid_h: int, grid_w: int, merge: int, window: int) -> int:
    return -(-(grid_h // merge) // window) * -(-(grid_w // merge) // window)


@dataclass(frozen=True)
class WindowLayout:
    patch_order: np.ndarray  # [N]: the raster (merge-block order) row of each window-ordered row
    window_index: np.ndarray  # [num_windows, window_patches] int64, -1 = padding
    patch_slots: np.ndarray  # [N] int64
    token_order: np.ndarray  # [N / merge^2]: reverse_indices, window-ordered tokens -> raster order

    @property
    def padding(self) -> float:
        """Padded slots of the windowed attention per real patch (0 when every window is whole)."""
        return self.window_index.size / len(self.patch_slots) - 1.0


@lru_cache(maxsize=64)
def window_layout(grid_h: int, grid_w: int, merge: int, window: int) -> WindowLayout:
    units, cu = window_order(grid_h, grid_w, merge, window)
    m2 = merge * merge
    lengths = np.diff(cu)
    n, slots = int(cu[-1]), window * window * m2
    patch_slots = np.repeat(np.arange(len(lengths)) * slots - cu[:-1], lengths) + np.arange(n)
    window_index = np.full((len(lengths), slots), -1, dtype=np.int64)
    window_index.reshape(-1)[patch_slots] = np.arange(n)
    for a in (units, window_index, patch_slots):
        a.setflags(write=False)  # cached: shared by every request for this grid
    return WindowLayout((units[:, None] * m2 + np.arange(m2)).reshape(-1), window_index, patch_slots, np.argsort(units))


def window_feeds(pixel_values: np.ndarray, grid_h: int, grid_w: int, merge: int, window: int, head_dim: int,
                 theta: float) -> dict[str, np.ndarray]:
    """The vision encoder's feeds for one image's patches (raster / merge-block order, as the processor emits them)."""
    lay = window_layout(grid_h, grid_w, merge, window)
    cos, sin = vision_rotary_tables(grid_h, grid_w, merge, head_dim, theta)
    return {
        "pixel_values": np.ascontiguousarray(pixel_values[lay.patch_order], dtype=np.float32),
        "rotary_cos": cos[lay.patch_order],
        "rotary_sin": sin[lay.patch_order],
        "window_index": lay.window_index,
        "patch_slots": lay.patch_slots,
    }


class Qwen25VLRuntime(Qwen2VLRuntime):
    """Qwen2-VL's hooks with the window layout around the vision encoder and the projector."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        self.window = int(self.vision["window_size"]) // self.merge // int(self.vision["patch_size"])

    def layout(self, img) -> WindowLayout:
        _, h, w = img.grid_thw
        return window_layout(h, w, self.merge, self.window)

    def vision_feeds(self, img) -> dict[str, np.ndarray]:
        _, h, w = img.grid_thw
        return window_feeds(img.pixel_values, h, w, self.merge, self.window, int(self.vision["head_dim"]), float(self.vision["rope_theta"]))

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**outputs, "image_embeds": outputs["image_embeds"][self.layout(img).token_order]}
