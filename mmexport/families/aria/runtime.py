"""Aria's host-side logic, torch-free: crops and pixel masks (image.py), the vision tower's per-patch mask and
position-embedding rows, placeholder expansion (crops x queries per crop, as AriaProcessor), 1D positions.

Method A (methods.EmbeddingMerge): each image's crops go through vision_encoder and projector as one batch;
the projector's queries replace the image's `<|img|>` tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import EmbeddingMerge
from .image import AriaEncodedImage, AriaImageParams, patch_mask, patch_position_ids, preprocess_aria


class AriaRuntime(EmbeddingMerge):
    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = AriaImageParams.from_dict(model_cfg["image"])
        vision = model_cfg["vision"]
        self.patch_size = int(vision["patch_size"])
        self.per_side = int(vision["num_patches_per_side"])
        # projector_patch_to_query_dict: patches per crop -> queries per crop
        self.queries = {int(k): int(v) for k, v in vision["patch_to_query"].items()}
        self.image_token = model_cfg.get("image_token", "<|img|>")
        self.image_token_id = int(model_cfg["tokens"]["image_token_id"])

    def preprocess(self, image) -> AriaEncodedImage:
        return preprocess_aria(image, self.image_params)

    def queries_per_crop(self) -> int:
        side = self.image_params.max_image_size // self.patch_size
        if side * side not in self.queries:
            raise UserError(f"crops of {self.image_params.max_image_size} pixels make {side * side} patches; the projector "
                            f"pools {', '.join(map(str, sorted(self.queries)))}")
        return self.queries[side * side]

    def image_token_count(self, img: AriaEncodedImage) -> int:
        return img.num_crops * self.queries_per_crop()

    def _patch_mask(self, img: AriaEncodedImage) -> np.ndarray:
        return patch_mask(img.pixel_mask, self.patch_size)

    def vision_feeds(self, img: AriaEncodedImage) -> dict[str, np.ndarray]:
        m = self._patch_mask(img)
        return {
            "pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32),
            "patch_position_ids": patch_position_ids(m, self.per_side),
            "patch_mask": m.reshape(m.shape[0], -1).astype(np.int64),
        }

    def projector_feeds(self, img: AriaEncodedImage, vision_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self._patch_mask(img)
        return {"vision_hidden": vision_outputs["vision_hidden"], "patch_mask": m.reshape(m.shape[0], -1).astype(np.int64)}

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[AriaEncodedImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)[None, :] + delta
