"""Idefics3 / SmolVLM host-side logic, torch-free: tiles + global view (image.py), the processor's prompt
expansion (`<fake_token_around_image>`, `<row_r_col_c>`, `<global-img>` around each tile's image tokens) and
plain 1D positions.

Method A: the vision encoder runs one image's tiles as a batch [tiles, 3, tile, tile]; the projector
(pixel shuffle + linear) gives [tiles, image_seq_len, hidden], written over the image tokens tile after tile
(global view last), as transformers' masked_scatter does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...runtime.methods import EmbeddingMerge
from .image import Idefics3ImageParams, image_prompt, preprocess_idefics3


@dataclass
class TiledImage:
    pixel_values: np.ndarray  # [tiles, 3, tile, tile] float32
    rows: int  # 0 when the image is a single tile (no global view)
    cols: int

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


class Idefics3Runtime(EmbeddingMerge):
    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = Idefics3ImageParams.from_dict(model_cfg["image"])
        self.tokens = model_cfg["tokens"]
        self.image_token_id = int(self.tokens["image_token_id"])
        self.image_token = model_cfg.get("image_token", "<image>")
        self.fake_token = model_cfg.get("fake_image_token", "<fake_token_around_image>")
        self.global_token = model_cfg.get("global_image_token", "<global-img>")
        self.seq_len = int(model_cfg["vision"]["image_seq_len"])

    def preprocess(self, image) -> TiledImage:
        return TiledImage(*preprocess_idefics3(image, self.image_params))

    def image_token_count(self, img: TiledImage) -> int:
        return self.seq_len * img.num_tiles

    def image_prompt(self, img: TiledImage) -> str:
        return image_prompt(img.rows, img.cols, self.seq_len, self.image_token, self.fake_token, self.global_token)

    def vision_feeds(self, img: TiledImage) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32)}

    def vision_limits(self, spec, img: TiledImage) -> str:
        d = spec.dims["num_tiles"]
        return f"it becomes {img.num_tiles} tiles, but this build's vision encoder takes {d.min} to {d.max} tiles per image"

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        e = outputs["image_embeds"]  # [tiles, seq_len, hidden] -> the image's tokens in prompt order
        return {**outputs, "image_embeds": e.reshape(-1, e.shape[-1])}

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[TiledImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    @staticmethod
    def step_positions(start: int, count: int, delta: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)[None, :] + delta
