"""The one decoder export for every Hugging Face text stack (imports torch: export side only).

`StaticCacheDecoder` wraps a text model (`model.model.language_model` of a VLM) and its LM head. The text
model's own `forward` runs unchanged — embeddings in, its rotary (1D, M-RoPE, per layer type), its decoder
layers, its final norm — with only the attention function swapped for the static-cache one (`attention.py`)
and, in mixture-of-experts layers, the experts function for the dense one (`experts.py`), so a new family's
decoder needs no code: its ComponentSpec (built by `decoder_spec`) says what the graph takes. Families with
extra decoder inputs add them to the spec and use the hooks: `stack_kwargs` (more keyword arguments for the
text model's forward) and `layer_hooks` (a function applied to a layer's output, e.g. Qwen3-VL's deepstack
features added after its first layers). A family whose layers are not all self-attention (mllama's cross-
attention layers) overrides `run_stack`.

Graph interface (see `decoder_spec`): inputs_embeds [B, S, hidden], position_ids ([B, S] or M-RoPE
[3, B, S]), cache_mask [B, cache_len], extra inputs, cache_key_i / cache_value_i [B, kv, cache_len, D]
per self-attention layer i, trailing inputs -> logits [B, 1, vocab] (last position), key_i / value_i
[B, kv, S, D] (this step's, written into the cache by the runtime).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..spec import ComponentSpec, Dim, TensorSpec
from .attention import static_cache, use_static_cache_attention
from .base import StaticKVCache
from .experts import use_dense_experts

POSITIONS = {
    "1d": ("batch", "seq_len"),
    "mrope": (3, "batch", "seq_len"),  # M-RoPE (temporal, height, width) rows, as Qwen2/2.5/3-VL
}


def decoder_spec(cache: StaticKVCache, hidden: int, vocab: int, positions: str = "1d",
                 extra_inputs: Sequence[TensorSpec] = (), trailing_inputs: Sequence[TensorSpec] = (),
                 extra_dims: dict[str, Dim] | None = None, doc: str = "", dtype: str = "float32") -> ComponentSpec:
    """The decoder's declaration: the static KV cache's inputs/outputs and profiles, the positions layout,
    and whatever a family adds (extra inputs after `cache_mask`, trailing inputs after the cache)."""
    mask_in, cache_in = cache.inputs()
    ctx = cache.capacity
    dims = {"batch": cache.batch_dim(), "seq_len": Dim("seq_len", 1, min(64, ctx), ctx), **cache.dims(), **(extra_dims or {})}
    return ComponentSpec(
        "decoder",
        inputs=(
            TensorSpec("inputs_embeds", dtype, ("batch", "seq_len", hidden)),
            TensorSpec("position_ids", "int64", POSITIONS[positions], "M-RoPE t/h/w positions" if positions == "mrope" else ""),
            *mask_in,
            *extra_inputs,
            *cache_in,
            *trailing_inputs,
        ),
        outputs=(TensorSpec("logits", dtype, ("batch", 1, vocab), "last position only"), *cache.outputs()),
        dims=dims,
        profiles=cache.profiles(),
        doc=doc or "decoder over a static KV cache (capacity = context)",
    )


def embed_spec(hidden: int, cache: StaticKVCache, dtype: str = "float32") -> ComponentSpec:
    """input_ids [B, S] -> inputs_embeds [B, S, hidden] (the checkpoint's own embedding table)."""
    ctx = cache.capacity
    return ComponentSpec(
        "embed_tokens",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq_len")),),
        outputs=(TensorSpec("inputs_embeds", dtype, ("batch", "seq_len", hidden)),),
        dims={"batch": cache.batch_dim(), "seq_len": Dim("seq_len", 1, min(64, ctx), ctx)},
    )


class StaticCacheDecoder(nn.Module):
    """A Hugging Face text stack over mmexport's static KV cache; see the module docstring."""

    # sliding windows also limit bidirectional image blocks ((causal OR block) AND window: Gemma 3), instead of
    # blocks reaching past the window ((causal AND window) OR block: Gemma 2 / PaliGemma)
    window_limits_blocks = False

    def __init__(self, spec: ComponentSpec, text_model, lm_head, final_logit_softcapping: float | None = None):
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.softcap = final_logit_softcapping
        self.input_names = spec.input_names
        self.layers = [int(n[len("cache_key_"):]) for n in self.input_names if n.startswith("cache_key_")]

    def forward(self, *inputs):
        x = dict(zip(self.input_names, inputs))
        caches = {i: (x[f"cache_key_{i}"], x[f"cache_value_{i}"]) for i in self.layers}
        cfg = self.text_model.config
        with use_static_cache_attention(cfg), use_dense_experts(cfg), \
                static_cache(x["cache_mask"], caches, x.get("image_block_ids"), self.window_limits_blocks) as ctx:
            h = self.run_stack(x)
        logits = self.lm_head(h[:, -1:, :])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        missing = [i for i in self.layers if i not in ctx.new]
        if missing:
            raise RuntimeError(f"decoder layers {missing} have a cache input but did not attend through it")
        return (logits, *[t for i in self.layers for t in ctx.new[i]])

    def run_stack(self, x: dict[str, Any]):
        """The text model's own forward on the new tokens (attention swapped); returns hidden states [B, S, H]."""
        hooks = [self.text_model.layers[i].register_forward_hook(_replace_output(fn)) for i, fn in self.layer_hooks(x).items()]
        try:
            out = self.text_model(inputs_embeds=x["inputs_embeds"], position_ids=x["position_ids"], use_cache=False, **self.stack_kwargs(x))
        finally:
            for h in hooks:
                h.remove()
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def stack_kwargs(self, x: dict[str, Any]) -> dict[str, Any]:
        """More keyword arguments for the text model's forward (none by default)."""
        return {}

    def layer_hooks(self, x: dict[str, Any]) -> dict[int, Callable[[Any], Any]]:
        """layer index -> function applied to that layer's output hidden states (none by default)."""
        return {}


def _replace_output(fn):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def decoder_example(spec: ComponentSpec, seed: int = 1234, seq: int = 7, past: int = 5, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Example inputs for tracing: a `seq`-token step after cached tokens, every dynamic size off 0/1 (the tracer
    would specialize those) and off the sizes verify feeds. When the build batches, two rows with their own cache
    lengths and positions (row b has `past - b` cached tokens), as the server's slots have. `overrides` replaces
    any input."""
    g = torch.Generator().manual_seed(seed)
    ctx = spec.dims["cache_len"].max
    batch = min(2, spec.dims["batch"].max)
    pasts = [past - b for b in range(batch)]
    sizes = {"batch": batch, "seq_len": seq, "cache_len": ctx}
    for name, d in spec.dims.items():  # a family's own dims: a size inside the range, off 0/1 where possible
        sizes.setdefault(name, min(d.max, max(d.min, 2)))
    out: dict[str, Any] = {}
    overrides = overrides or {}
    for t in spec.inputs:
        if t.name in overrides:
            out[t.name] = overrides[t.name]
            continue
        shape = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in t.shape)
        if t.name == "position_ids":
            pos = torch.stack([torch.arange(p, p + seq) for p in pasts])  # [batch, seq]
            out[t.name] = pos.expand(*shape).contiguous()
        elif t.name == "cache_mask":
            m = torch.zeros(shape, dtype=torch.int64)
            for b, p in enumerate(pasts):
                m[b, :p] = 1
            out[t.name] = m
        elif t.dtype == "int64":
            out[t.name] = torch.zeros(shape, dtype=torch.int64)
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out
