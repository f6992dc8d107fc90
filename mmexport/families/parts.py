"""Small torch wrappers every family uses (export side only)."""
from __future__ import annotations

from torch import nn


class EmbedTokens(nn.Module):
    """input_ids [B, S] -> inputs_embeds [B, S, hidden] (the checkpoint's own embedding module, scaling included)."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class ModuleCall(nn.Module):
    """A checkpoint module whose forward already has the component's interface (a projector, a merger)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)
