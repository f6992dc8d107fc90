"""Qwen2-VL's host-side logic, torch-free: image -> patches, 2D rotary tables for the vision encoder,
placeholder expansion, and M-RoPE position ids with the rope delta used by decode steps.

Each function mirrors a transformers function and is tested against it:
  vision_rotary_tables  ~ Qwen2VisionTransformerPretrainedModel's rotary (get_vision_position_ids + rotary_pos_emb)
  rope_index            ~ Qwen2VLModel.get_rope_index
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import EmbeddingMerge
from .image import Qwen2VLImageParams, preprocess_image


def vision_position_ids(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """[h*w, 2] (row, col) of each patch, in merge-block order (transformers' get_vision_position_ids)."""
    hpos, wpos = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    block = (grid_h // merge, merge, grid_w // merge, merge)
    hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([hpos, wpos], axis=-1)


def vision_rotary_tables(grid_h: int, grid_w: int, merge: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [h*w, head_dim] float32 for one image (axial 2D rope, same freqs for rows and cols)."""
    spatial = head_dim // 2
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))).astype(np.float32)
    pos = vision_position_ids(grid_h, grid_w, merge).astype(np.float32)  # [N, 2]
    freqs = pos[..., None] * inv_freq  # [N, 2, spatial/2]
    hw = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # [N, spatial]
    full = np.concatenate([hw, hw], axis=-1)  # [N, head_dim]
    return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def rope_index(input_ids: Sequence[int], grids: Sequence[tuple[int, int, int]], image_token_id: int, merge: int) -> tuple[np.ndarray, int]:
    """M-RoPE position ids [3, S] (int64) and the rope delta for one sequence.

    Text tokens advance all three rows together; the n = t*h*w/merge^2 tokens of an image get
    (t, row, col) positions offset by the running position, which then advances by max(h, w)/merge.
    Decode step k (0-based, after a prompt of S tokens) uses position S + k + delta on all rows.
    """
    ids = np.asarray(input_ids)
    S = len(ids)
    pos = np.zeros((3, S), dtype=np.int64)
    cur, i, img = 0, 0, 0
    while i < S:
        if ids[i] == image_token_id:
            if img >= len(grids):
                raise UserError("the prompt has more image placeholders than images")
            t, h, w = grids[img]
            lt, lh, lw = t, h // merge, w // merge
            n = lt * lh * lw
            if i + n > S or not np.all(ids[i : i + n] == image_token_id):
                raise UserError(f"image {img + 1}: expected {n} consecutive image tokens in the prompt")
            T, H, W = np.meshgrid(np.arange(lt), np.arange(lh) + cur, np.arange(lw) + cur, indexing="ij")
            pos[:, i : i + n] = np.stack([T.reshape(-1) + cur, H.reshape(-1), W.reshape(-1)])
            cur += max(h, w) // merge
            i += n
            img += 1
        else:
            j = i
            while j < S and ids[j] != image_token_id:
                j += 1
            pos[:, i:j] = np.arange(j - i) + cur
            cur += j - i
            i = j
    if img != len(grids):
        raise UserError(f"{len(grids)} images but {img} image placeholders in the prompt")
    delta = int(pos.max()) + 1 - S if S else 0
    return pos, delta


@dataclass
class EncodedImage:
    pixel_values: np.ndarray  # [P, patch_dim]
    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


class Qwen2VLRuntime(EmbeddingMerge):
    """The Qwen2-VL hooks of the generic pipeline (Method A, see methods.py)."""

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = Qwen2VLImageParams.from_dict(model_cfg["image"])
        self.vision = model_cfg["vision"]
        self.tokens = model_cfg["tokens"]
        self.image_token_id = int(self.tokens["image_token_id"])
        self.image_token = model_cfg.get("image_token", "<|image_pad|>")
        self.merge = int(self.vision["spatial_merge_size"])

    def preprocess(self, image) -> EncodedImage:
        pv, grid = preprocess_image(image, self.image_params)
        return EncodedImage(pv, tuple(int(g) for g in grid))

    def vision_limits(self, spec, img: EncodedImage) -> str:
        """What this build's vision encoder accepts, in pixels, for an image that Qwen2-VL's resizing maps
        outside the declared patch range (an aspect ratio so extreme that the short side stays at one
        merge block while the long side keeps growing past max_pixels)."""
        d, p = spec.dims["num_patches"], self.image_params
        px = p.patch_size**2
        _, gh, gw = img.grid_thw
        return (f"Qwen2-VL's resizing makes it {gw * p.patch_size}x{gh * p.patch_size} = {gh * gw * px} pixels ({gh * gw} patches), "
                f"but this build's vision encoder takes {d.min * px} to {d.max * px} pixels ({d.min}-{d.max} patches of "
                f"{p.patch_size}x{p.patch_size}); aspect ratios up to {d.max * px // p.factor**2}:1 always fit: crop or pad the image")

    def image_token_count(self, img: EncodedImage) -> int:
        t, h, w = img.grid_thw
        return t * h * w // (self.merge**2)

    def vision_feeds(self, img: EncodedImage) -> dict[str, np.ndarray]:
        _, h, w = img.grid_thw
        cos, sin = vision_rotary_tables(h, w, self.merge, int(self.vision["head_dim"]), float(self.vision["rope_theta"]))
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32), "rotary_cos": cos, "rotary_sin": sin}

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[EncodedImage]) -> tuple[np.ndarray, int]:
        """position_ids [3, 1, S] for the prompt and the delta that decode steps add."""
        pos, delta = rope_index(input_ids, [im.grid_thw for im in images], self.image_token_id, self.merge)
        return pos[:, None, :], delta

    @staticmethod
    def step_positions(start: int, count: int, delta: int) -> np.ndarray:
        """position_ids [3, 1, count] for `count` text tokens that follow `start` cached tokens."""
        p = np.arange(start, start + count, dtype=np.int64) + delta
        return np.broadcast_to(p, (3, 1, count)).copy()
