"""Llama 3.2 Vision's host-side logic, torch-free: tiling preprocessing (image.py), plain 1D
positions, and the per-token, per-tile cross-attention mask that MllamaProcessor builds.

Method B (methods.CrossAttention): one `<|image|>` token per image stays in the prompt; the decoder's
cross-attention layers read keys/values computed once per request by `cross_kv`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import CrossAttention
from .image import MllamaEncodedImage, MllamaImageParams, cross_attention_token_mask, dense_cross_attention_mask, preprocess_mllama


class MllamaRuntime(CrossAttention):
    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = MllamaImageParams.from_dict(model_cfg["image"])
        self.image_token = model_cfg.get("image_token", "<|image|>")
        self.image_token_id = int(model_cfg["tokens"]["image_token_id"])
        self.max_tiles = int(model_cfg["vision"]["max_tiles"])
        self.cross_layers = list(model_cfg["text"]["cross_attention_layers"])

    def preprocess(self, image) -> MllamaEncodedImage:
        return preprocess_mllama(image, self.image_params)

    def vision_feeds(self, img: MllamaEncodedImage) -> dict[str, np.ndarray]:
        return {
            "pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32),
            "aspect_ratio_id": np.asarray([img.aspect_ratio_id], dtype=np.int64),
            "aspect_ratio_mask": np.ascontiguousarray(img.aspect_ratio_mask, dtype=np.int64),
        }

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[MllamaEncodedImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    def prompt_extras(self, input_ids: np.ndarray, images: Sequence[MllamaEncodedImage]) -> dict[str, np.ndarray]:
        n = int(np.count_nonzero(input_ids == self.image_token_id))
        if n != len(images):
            raise UserError(f"the prompt has {n} {self.image_token} token(s) for {len(images)} image(s)")
        if not images:
            return {}
        spans = cross_attention_token_mask(input_ids, self.image_token_id)
        mask = dense_cross_attention_mask(spans, [im.num_tiles for im in images], self.max_tiles, len(input_ids))
        return {"cross_attention_mask": mask}  # [S, images, max_tiles]
