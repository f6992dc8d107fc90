"""Qwen3-VL's host-side logic, torch-free. Preprocessing, the 2D rotary tables, placeholder expansion and
M-RoPE positions are Qwen2-VL's (for images Qwen3-VL's `get_rope_index` gives the same positions; its
differences, frame timestamps, concern video). Added here:

  position_embedding_taps  ~ transformers' get_vision_interpolation_indices_and_weights (bilinear,
                             align_corners): which rows of the learned position table each patch reads,
                             and with which weights; the graph only gathers and weights them
  deepstack                 the projector's per-layer deepstack features scattered to the image positions
                             of the prompt ([n_deep, 1, S, hidden], zeros at text positions, for text-only
                             prompts and for decode steps); the decoder adds them after its first layers
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..qwen2_vl.runtime import Qwen2VLRuntime, vision_position_ids


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (floor, floor + 1, clamped) and weights along one axis, align_corners=True, in float32
    exactly as transformers computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def position_embedding_taps(grid_h: int, grid_w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """pos_indices [h*w, 4] int64 into the flattened (side x side) learned position table and pos_weights
    [h*w, 4] float32: the table bilinearly resized to the image's patch grid, patches in merge-block order."""
    pos = vision_position_ids(grid_h, grid_w, merge)
    h_taps, h_w = _axis_taps(pos[:, 0], grid_h, side)
    w_taps, w_w = _axis_taps(pos[:, 1], grid_w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(weights, dtype=np.float32)


class Qwen3VLRuntime(Qwen2VLRuntime):
    """The Qwen3-VL hooks of the generic pipeline (Method A with deepstack decoder inputs)."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        self.pos_side = int(self.vision["num_grid_per_side"])
        self.n_deep = len(self.vision["deepstack_visual_indexes"])
        self.hidden = int(model_cfg["text"]["hidden_size"])

    def vision_feeds(self, img) -> dict[str, np.ndarray]:
        _, h, w = img.grid_thw
        indices, weights = position_embedding_taps(h, w, self.merge, self.pos_side)
        return {**super().vision_feeds(img), "pos_indices": indices, "pos_weights": weights}

    def projector_feeds(self, img, vision_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"vision_hidden": vision_outputs["vision_hidden"], "deepstack_hidden": vision_outputs["deepstack_hidden"]}

    # the vision state of a request: per image, the projector's outputs (image_embeds, deepstack_embeds)
    def encode_images(self, pipe, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        return [self.encode_image(pipe, im) for im in images]

    def prompt_embeds(self, pipe, prep, state: list[dict[str, np.ndarray]]) -> np.ndarray:
        return self.merge_embeds(prep.input_ids, pipe.embed(prep.input_ids), [s["image_embeds"] for s in state])

    def deepstack_feed(self, ids: np.ndarray, state: list[dict[str, np.ndarray]] | None) -> np.ndarray:
        """[n_deep, 1, S, hidden]: each image's deepstack features at its image tokens, zeros elsewhere."""
        out = np.zeros((self.n_deep, 1, len(ids), self.hidden), dtype=np.float32)
        if state:
            where = np.flatnonzero(np.asarray(ids) == self.image_token_id)
            out[:, 0, where] = np.concatenate([s["deepstack_embeds"] for s in state], axis=1)
        return out

    def prefill_feeds(self, prep, state) -> dict[str, np.ndarray]:
        return {**super().prefill_feeds(prep, state), "deepstack_embeds": self.deepstack_feed(prep.input_ids, state)}

    def step_feeds(self, prep, state, start: int) -> dict[str, np.ndarray]:
        return {**super().step_feeds(prep, state, start), "deepstack_embeds": np.zeros((self.n_deep, 1, 1, self.hidden), np.float32)}
