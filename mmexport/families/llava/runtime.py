"""LLaVA-1.5's host side, torch-free: transformers' CLIPImageProcessor / LlavaImageProcessor (PIL) through the shared
fixed-size pipeline, `<image>` expanded to the tower's token count, plain 1D positions (towers_runtime.TowerRuntime)."""
from __future__ import annotations

from ..towers_runtime import TowerRuntime


class LlavaRuntime(TowerRuntime):
    pass
