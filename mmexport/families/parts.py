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


def pixel_shuffle_tokens(x, scale: int):
    """Space-to-depth over each tile's square token grid: [B, side*side, C] -> [B, (side/scale)^2, C*scale^2]
    (Idefics3 / SmolVLM's connector and InternVL's pixel_shuffle: the same layout; runtime/imageops has the numpy
    twin). Only reshapes and transposes with static sizes besides the batch of tiles."""
    b, seq, c = x.shape
    side = int(round(seq**0.5))
    y = x.reshape(b, side, side // scale, c * scale).transpose(1, 2)
    y = y.reshape(b, side // scale, side // scale, c * scale * scale).transpose(1, 2)
    return y.reshape(b, seq // (scale * scale), c * scale * scale)
