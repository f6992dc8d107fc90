"""Attention over the static KV cache, registered in transformers' attention-function registry
(imports torch: export side only).

Hugging Face decoder layers look their attention function up by name
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`). For export, the text stack's
config is switched to `STATIC_CACHE_ATTENTION` (see `static_cache_attention`), so every HF decoder layer —
Llama, Qwen2/2.5/3, Mistral, Gemma 2/3, Phi-3, Persimmon, mllama's self-attention layers — runs its own
projections, q/k norms and rotary unchanged and calls `attend` below for the attention itself.
transformers builds no mask for an implementation it does not know, so `attend` applies every mask itself:

- the cache mask: `cache_mask [B, cache_len]` (1 = slot filled) over the preallocated cache buffer;
- causal among the new tokens;
- a sliding window, when the layer passes `sliding_window` (HF's rule: key index > query index - window;
  a token's index is its place in the sequence, i.e. its cache slot);
- bidirectional blocks: tokens of the same image (`image_block_ids [B, S]`, > 0) see each other (beyond a
  sliding window by default, as Gemma 2 / PaliGemma; within it when the decoder's `window_limits_blocks` is set,
  as Gemma 3);
- soft-capping of the scores, when the layer passes `softcap` (Gemma 2);

then softmax in fp32 over [cache | new] without concatenating the cache (grouped-query heads stacked
along the rows, so the cache is read once per KV head), and records the new keys/values, which the
decoder returns for the runtime to write into its buffer. The layout is gpt-fast's: the runtime owns
`[B, kv_heads, capacity, head_dim]` buffers and never copies them; the graph's cache axis is either the
whole buffer or zero slots (a request's first prefill).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

STATIC_CACHE_ATTENTION = "mmexport_static_cache"
NEG = torch.finfo(torch.float32).min

_ACTIVE: list["CacheContext"] = []


class CacheContext:
    """The static cache of one decoder forward: its buffers (read), the new keys/values (recorded) and the
    masks derived from `cache_mask` (built once per window size and shared by the layers)."""

    def __init__(self, cache_mask: torch.Tensor, caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 block_ids: torch.Tensor | None = None, window_limits_blocks: bool = False):
        self.cache_mask = cache_mask
        self.caches = caches
        self.block_ids = block_ids
        # how a sliding window and a bidirectional block combine: (causal AND window) OR block (Gemma 2 /
        # PaliGemma, default), or (causal OR block) AND window (Gemma 3's sliding layers in transformers 5)
        self.window_limits_blocks = window_limits_blocks
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._biases: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def biases(self, seq: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive fp32 biases (0 = attend, NEG = masked) over the cache slots, [B, 1, 1 or S, cache_len],
        and among the new tokens, [1 or B, 1, S, S]."""
        if window not in self._biases:  # every layer of one forward sees the same `seq` (a symbolic size: no dict key)
            self._biases[window] = self._make(seq, window)
        return self._biases[window]

    def _make(self, seq: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.cache_mask.bool()  # [B, C]
        bsz = mask.shape[0]
        zero = torch.zeros((), dtype=torch.float32)
        neg = torch.full((), NEG)
        i = torch.arange(seq, device=mask.device)
        causal = i.view(1, seq) <= i.view(seq, 1)  # [S(query), S(key)]
        new_ok = causal
        if window is not None:
            in_window = i.view(seq, 1) - i.view(1, seq) < window
            new_ok = new_ok & in_window
            # query n sits at sequence index past + n; cache slot j holds index j
            past = self.cache_mask.sum(-1, keepdim=True)  # [B, 1]
            q_idx = past.view(bsz, 1, 1) + i.view(1, seq, 1)  # [B, S, 1]
            slots = torch.arange(mask.shape[1], device=mask.device).view(1, 1, -1)
            cache_ok = mask.view(bsz, 1, -1) & (slots > q_idx - window)  # [B, S, C]
            cache_bias = torch.where(cache_ok, zero, neg).view(bsz, 1, seq, -1)
        else:
            cache_bias = torch.where(mask, zero, neg).view(bsz, 1, 1, -1)
        new_ok = new_ok.view(1, seq, seq)
        if self.block_ids is not None:
            b = self.block_ids
            same = (b.view(bsz, seq, 1) == b.view(bsz, 1, seq)) & (b.view(bsz, seq, 1) > 0)
            if window is not None and self.window_limits_blocks:
                new_ok = (causal.view(1, seq, seq) | same) & in_window.view(1, seq, seq)
            else:
                new_ok = new_ok | same  # [B, S, S]
        new_bias = torch.where(new_ok, zero, neg).unsqueeze(1)
        return cache_bias, new_bias


@contextmanager
def static_cache(cache_mask: torch.Tensor, caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 block_ids: torch.Tensor | None = None, window_limits_blocks: bool = False) -> Iterator[CacheContext]:
    """Make `caches` (layer index -> (keys, values) buffers) what `attend` reads during the block."""
    ctx = CacheContext(cache_mask, caches, block_ids, window_limits_blocks)
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()


def attend_over_cache(q, k, v, cache_k, cache_v, cache_bias, new_bias, scaling: float, softcap: float | None = None):
    """softmax([q·cache_kᵀ | q·kᵀ] · scaling (soft-capped) + biases) · [cache_v | v], the cache never concatenated.

    q [B, H, S, D]; k, v [B, kv, S, D]; cache_k, cache_v [B, kv, C, D]; cache_bias [B, 1, 1 or S, C];
    new_bias [1 or B, 1, S, S] -> [B, S, H, D]. The `groups` = H / kv query heads that share a KV head are
    stacked along the rows ([B, kv, groups*S, D], row g*S + s), so the cache is read as it is instead of
    being repeated per head (a copy of the whole cache per layer and step)."""
    bsz, heads, seq, dim = q.shape
    kvh = k.shape[1]
    groups = heads // kvh
    capacity = cache_k.shape[2]
    qg = q.reshape(bsz, kvh, groups * seq, dim)
    s_cache = torch.matmul(qg, cache_k.transpose(2, 3)).float() * scaling
    s_new = torch.matmul(qg, k.transpose(2, 3)).float() * scaling
    if softcap:
        s_cache = torch.tanh(s_cache / softcap) * softcap
        s_new = torch.tanh(s_new / softcap) * softcap
    if cache_bias.shape[2] > 1:
        cache_bias = cache_bias.repeat(1, 1, groups, 1)
    s_cache = s_cache + cache_bias
    s_new = s_new + new_bias.repeat(1, 1, groups, 1)
    w = torch.softmax(torch.cat([s_cache, s_new], dim=-1), dim=-1).to(q.dtype)
    o = torch.matmul(w[..., :capacity], cache_v) + torch.matmul(w[..., capacity:], v)  # [B, kv, groups*S, D]
    return o.reshape(bsz, heads, seq, dim).transpose(1, 2)


def cross_attend(q, ck, cv, bias, scaling: float):
    """softmax(q·ckᵀ + bias) · cv over fixed keys/values: q [B, H, S, D]; ck, cv [B, kv, N, D]; bias
    [B, 1, S, N] (fp32) -> [B, S, H*D]. Grouped-query heads are stacked along the rows, so the N keys/values
    (tiles x patches: 6,404 for Llama 3.2 Vision's four tiles) are read once per KV head instead of being
    repeated per query head; the bias is broadcast over the groups, not repeated."""
    bsz, heads, seq, dim = q.shape
    kvh = ck.shape[1]
    groups = heads // kvh
    s = torch.matmul(q.reshape(bsz, kvh, groups * seq, dim), ck.transpose(2, 3)).float() * scaling
    s = s.view(bsz, kvh, groups, seq, -1) + bias.unsqueeze(2)
    w = torch.softmax(s, dim=-1).to(q.dtype).view(bsz, kvh, groups * seq, -1)
    o = torch.matmul(w, cv).reshape(bsz, heads, seq, dim)
    return o.transpose(1, 2).reshape(bsz, seq, heads * dim)


def attend(module, query, key, value, attention_mask=None, scaling: float | None = None, dropout: float = 0.0,
           sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """The attention function HF layers call (AttentionInterface signature): query [B, H, S, D],
    key/value [B, kv, S, D] (rotary applied, no cache update) -> ([B, S, H, D], None)."""
    if not _ACTIVE:
        raise RuntimeError(f"{STATIC_CACHE_ATTENTION} attention runs only inside mmexport's decoder export")
    ctx = _ACTIVE[-1]
    layer = int(module.layer_idx)
    if layer not in ctx.caches:
        raise RuntimeError(f"layer {layer} has no cache input in this decoder")
    ctx.new[layer] = (key, value)
    cache_k, cache_v = ctx.caches[layer]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    cache_bias, new_bias = ctx.biases(query.shape[2], sliding_window)
    return attend_over_cache(query, key, value, cache_k, cache_v, cache_bias, new_bias, scaling, softcap), None


def register() -> None:
    """Register `attend` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_CACHE_ATTENTION, attend)


@contextmanager
def use_static_cache_attention(config) -> Iterator[None]:
    """Switch `config` (a text stack's config, shared by its layers) to the static-cache attention for the block."""
    register()
    before = config._attn_implementation
    config._attn_implementation = STATIC_CACHE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
