"""Gemma 3's host side, torch-free (towers_runtime.TowerRuntime with Gemma 3's settings from the manifest): the chat
template writes `<start_of_image>` per image, which becomes "\\n\\n<start_of_image>" + `<image_soft_token>` x
mm_tokens_per_image + "<end_of_image>\\n\\n" (Gemma3Processor's full_image_sequence); the template writes the BOS
itself (no special tokens added); 1D positions; `image_block_ids` numbers each image's run of soft tokens (1, 2, ...)
so its tokens attend each other bidirectionally (transformers' token_type_ids -> block ids), everything else causal.
Pan-and-scan crops are not supported (the build refuses a checkpoint that enables them)."""
from __future__ import annotations

from ..towers_runtime import TowerRuntime


class Gemma3Runtime(TowerRuntime):
    pass
