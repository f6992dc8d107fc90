"""PaliGemma's host side, torch-free (towers_runtime.TowerRuntime with PaliGemma's settings from the manifest):

- the prompt is PaliGemmaProcessor's, not a chat template (the checkpoints ship none): `<image>` x 256 per image,
  then BOS, the text, and "\\n" (the build writes that format as the default chat template; the tokenizer adds no
  special tokens: the processor switches its BOS off);
- positions count from 1 (transformers' PaliGemma adds 1 to every position id);
- the prefix (images + prompt) is one bidirectional block (`image_block_ids` = 1 for every prompt token: the
  processor's token_type_ids are 0 there, which transformers turns into one block), generated tokens are causal.
"""
from __future__ import annotations

from ..towers_runtime import TowerRuntime


class PaliGemmaRuntime(TowerRuntime):
    pass
