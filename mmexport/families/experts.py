"""Mixture-of-experts layers for export: a dense experts function registered in transformers' experts
registry (imports torch: export side only).

transformers' MoE blocks (`@use_experts_implementation` classes: Aria, Mixtral, Qwen2/3-MoE, DeepSeek, ...)
look their experts forward up by name (`ALL_EXPERTS_FUNCTIONS.get_interface(config._experts_implementation)`),
as decoder layers look up their attention function. Their own implementations route tokens with data-
dependent shapes: the eager loop (`nonzero` over the experts hit, `torch.where`, `index_add_`),
`batched_mm` (gathers each token's expert weights: [tokens x top_k, hidden, intermediate] weight copies),
`grouped_mm` (sorts tokens by expert, ragged offsets). None of them exports to a TensorRT-friendly graph.

`DENSE_EXPERTS` runs every expert over every token and weights each expert's output by the router's
weight for it (the top-k weights where the token chose the expert, 0 elsewhere):

    dense_w [T, E] = sum_k (top_k_index[:, k] == e) * top_k_weights[:, k]
    out = sum_e dense_w[:, e] * down_e(act(gate_e(x)) * up_e(x))

Shapes are static given the token count (no NonZero, no gathers of weights per token) and the expert loop is
unrolled over the config's fixed expert count. No tensor has a tokens x experts x width shape: each expert's
activations are [T, intermediate], accumulated into one [T, hidden] sum (only the [T, E] routing weights
span the experts), so a runtime that runs the nodes in order holds one expert's activations at a time. The cost is compute: every
expert runs on every token, E / top_k times the routed FLOPs of the sparse layer (Aria: 64 experts, top-6:
about 10.7x), and each decode step reads every expert's weights instead of the top_k chosen ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn import functional as F

DENSE_EXPERTS = "mmexport_dense"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one MoE layer over all tokens: hidden_states [T, H], top_k_index / top_k_weights [T, k]."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    num_experts = up.shape[0]
    experts = torch.arange(num_experts, device=hidden_states.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)  # [T, k, E]
    dense_w = (chosen * top_k_weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
    out = torch.zeros_like(hidden_states)
    for e in range(num_experts):
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[e] if self.has_bias else None
        h = _linear(hidden_states, up[e], up_bias, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _linear(h, self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None, self.is_transposed)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        out = out + h * dense_w[:, e:e + 1].to(h.dtype)
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Register the dense experts function; False when this transformers has no experts registry."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    if DENSE_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS, dense_experts_forward)
    return True


@contextmanager
def use_dense_experts(config) -> Iterator[None]:
    """Switch `config` (a text stack's config, shared by its layers) to the dense experts for the block; a no-op
    for stacks without experts (their layers never read the setting)."""
    if not register() or not hasattr(config, "_experts_implementation_internal"):
        yield
        return
    before = config._experts_implementation_internal
    config._experts_implementation_internal = DENSE_EXPERTS
    try:
        yield
    finally:
        config._experts_implementation_internal = before
