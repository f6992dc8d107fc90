"""Attention glue shared by the decoder wrappers of every family (imports torch: export side only).

The static KV cache layout (see base.StaticKVCache, runtime/pipeline.py KVCache): the decoder reads the
whole preallocated `[B, kv_heads, capacity, head_dim]` buffer (or a zero-length view while it is empty),
masked by `cache_mask [B, capacity]`, plus the new tokens' keys/values, and returns only the new ones.
Scores against the cache and against the new tokens are joined (a small [.., S, capacity + S] tensor),
soft-maxed in fp32 and split again, so the cache itself is never concatenated or copied inside the graph.
"""
from __future__ import annotations

import torch
from torch import nn

NEG = torch.finfo(torch.float32).min


def cache_biases(cache_mask: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive fp32 biases: over the cache slots [B, 1, 1, capacity] (0 where filled) and causal among
    the `seq` new tokens [1, 1, S, S]."""
    bsz = cache_mask.shape[0]
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), NEG)
    cache_bias = torch.where(cache_mask.bool().view(bsz, 1, 1, -1), zero, neg)
    i = torch.arange(seq, device=cache_mask.device)
    new_bias = torch.where((i.view(1, seq) <= i.view(seq, 1)).view(1, 1, seq, seq), zero, neg)
    return cache_bias, new_bias


def attend_with_cache(q, k, v, cache_k, cache_v, cache_bias, new_bias, scaling: float, groups: int):
    """softmax([q·cache_kᵀ | q·kᵀ] + biases) · [cache_v | v] without concatenating the cache.

    q [B, H, S, D]; k, v [B, kv, S, D]; cache_k, cache_v [B, kv, capacity, D] -> [B, S, H*D].
    Grouped-query attention without repeating the keys/values per head: the `groups` query heads that
    share a KV head are stacked along the rows ([B, kv, groups*S, D]), so the cache is read as it is
    instead of being expanded (a copy of the whole cache per layer and step) to H heads."""
    bsz, heads, seq, dim = q.shape
    capacity = cache_k.shape[2]
    qg = q.reshape(bsz, heads // groups, groups * seq, dim)
    s_cache = torch.matmul(qg, cache_k.transpose(2, 3)).float() * scaling + cache_bias
    s_new = torch.matmul(qg, k.transpose(2, 3)).float() * scaling + new_bias.repeat(1, 1, groups, 1)
    w = torch.softmax(torch.cat([s_cache, s_new], dim=-1), dim=-1).to(q.dtype)
    o = torch.matmul(w[..., :capacity], cache_v) + torch.matmul(w[..., capacity:], v)  # [B, kv, groups*S, D]
    return o.reshape(bsz, heads, seq, dim).transpose(1, 2).reshape(bsz, seq, heads * dim)


def cross_attend(q, ck, cv, bias, scaling: float, groups: int):
    """softmax(q·ckᵀ + bias) · cv for cross-attention over fixed keys/values (Method B's image K/V).

    q [B, H, S, D]; ck, cv [B, kv, N, D]; bias [B, 1, S, N] (fp32) -> [B, S, H*D]. Grouped-query heads
    are stacked along the rows as in `attend_with_cache`, so the N keys/values (tiles x patches: 6,404
    for Llama 3.2 Vision's four tiles) are read once per KV head instead of being repeated per query
    head; the bias is broadcast over the groups, not repeated."""
    bsz, heads, seq, dim = q.shape
    kvh = heads // groups
    s = torch.matmul(q.reshape(bsz, kvh, groups * seq, dim), ck.transpose(2, 3)).float() * scaling
    s = s.view(bsz, kvh, groups, seq, -1) + bias.unsqueeze(2)
    w = torch.softmax(s, dim=-1).to(q.dtype).view(bsz, kvh, groups * seq, -1)
    o = torch.matmul(w, cv).reshape(bsz, heads, seq, dim)
    return o.transpose(1, 2).reshape(bsz, seq, heads * dim)


class EmbedTokens(nn.Module):
    """input_ids [B, S] -> inputs_embeds [B, S, hidden] (the checkpoint's own embedding table)."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)
