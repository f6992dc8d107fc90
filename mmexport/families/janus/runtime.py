"""Janus's host-side logic, torch-free: image -> pixels, and the prompt as JanusProcessor builds it.

JanusProcessor (generation_mode "text", the understanding path) does three things to the chat-rendered text:
  - with `use_default_system_prompt` (true in the released checkpoints' processor_config.json) it prepends its
    DEFAULT_SYSTEM_PROMPT to the text (outside the chat template);
  - it replaces each `<image_placeholder>` with `<begin_of_image>` + `<image_placeholder>` x num_image_tokens +
    `<end_of_image>` (`replace_image_token`);
  - its tokenizer adds the special tokens (a BOS), as a tokenizer call does by default.
Positions are plain 1D (the decoder is Llama).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...runtime.methods import EmbeddingMerge
from .image import JanusImageParams, preprocess_image


class JanusRuntime(EmbeddingMerge):
    """The Janus hooks of the generic pipeline (Method A, see runtime/methods.py)."""

    add_special_tokens = True  # JanusProcessor tokenizes with the tokenizer's special tokens (the BOS)

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = JanusImageParams.from_dict(model_cfg["image"])
        tokens = model_cfg["tokens"]
        self.image_token = str(tokens["image_token"])
        self.image_token_id = int(tokens["image_token_id"])
        self.boi_token = str(tokens["boi_token"])
        self.eoi_token = str(tokens["eoi_token"])
        self.num_image_tokens = int(model_cfg["num_image_tokens"])
        self.system_prompt = str(model_cfg.get("system_prompt") or "")

    def preprocess(self, image) -> np.ndarray:
        """pixel_values [3, size, size] float32 (JanusImageProcessorPil)."""
        return preprocess_image(image, self.image_params)

    def image_token_count(self, img) -> int:
        return self.num_image_tokens

    def image_text(self, img) -> str:
        return self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token

    def prompt_text(self, text: str) -> str:
        return self.system_prompt + text

    def reference_pixels(self, img) -> np.ndarray:
        return img

    def vision_feeds(self, img) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img, dtype=np.float32)[None]}

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[Any]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)[None, :] + delta
