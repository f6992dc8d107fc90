"""Janus's host side, torch-free: the shared fixed-tower runtime (towers_runtime.TowerRuntime: a batch of pictures
through the vision tower and the aligner, 1D positions) with Janus's image processor and prompt.

JanusProcessor (generation_mode "text", the understanding path) does three things to the chat-rendered text:
  - with `use_default_system_prompt` (true in the released checkpoints' processor_config.json) it prepends its
    DEFAULT_SYSTEM_PROMPT, outside the chat template;
  - it replaces each `<image_placeholder>` with `<begin_of_image>` + `<image_placeholder>` x num_image_tokens +
    `<end_of_image>` (`replace_image_token`; the towers' `image_sequence` in the manifest);
  - its tokenizer adds the special tokens (the DeepSeek tokenizer's BOS), as a tokenizer call does by default.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..towers_runtime import TowerRuntime
from .image import JanusImageParams, preprocess_image


class JanusRuntime(TowerRuntime):
    params_class = JanusImageParams

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)  # image_sequence: <begin_of_image> + <image_placeholder> x N + <end_of_image>
        self.system_prompt = str(model_cfg.get("system_prompt") or "")

    def pictures(self, image) -> np.ndarray:
        """[1, 3, size, size]: JanusImageProcessorPil (longest edge resized, centred on the mean colour)."""
        return preprocess_image(image, self.image_params)[None]

    def prompt_text(self, text: str) -> str:
        return self.system_prompt + text

    def add_special_tokens(self, text: str, special_tokens: dict[str, str]) -> bool:
        return True  # JanusProcessor calls its tokenizer with the default add_special_tokens=True, whatever the text
