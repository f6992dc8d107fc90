"""Qwen2-VL (Method A: image patches become token embeddings for an unmodified decoder), export side.

Components, each exported on its own:
  vision_encoder  one image's flat patch sequence -> ViT hidden states. Patch embedding + blocks.
                  The 2D rotary tables are computed by the runtime and passed in; one image per call
                  (full attention inside the image), so no data-dependent splits and no dense mask
                  across images. The runtime loops over images.
  projector       PatchMerger: LayerNorm, 2x2 spatial merge, MLP -> LLM width.
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder (families/decoder.py) with M-RoPE position ids [3, B, S].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import Qwen2VLImageParams
from .reference import Qwen2VLReference
from .runtime import vision_rotary_tables

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template shipped with Qwen/Qwen2-VL-2B-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def attend(q, k, v, scaling: float, bias=None):
    """softmax(q·kᵀ · scaling + bias) · v over [..., heads, length, head_dim], the softmax in fp32."""
    import torch

    w = torch.matmul(q, k.transpose(-1, -2)) * scaling
    w = w.float() if bias is None else w.float() + bias
    return torch.matmul(torch.softmax(w, dim=-1).to(q.dtype), v)


def full_attention(block: int, q, k, v, scaling: float):
    """Every patch of the image attends to every other: q, k, v [P, H, D] -> [P, H, D]."""
    return attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scaling).transpose(0, 1)


def vit_block(blk, x, rotary_cos, rotary_sin, attention: Callable[..., Any] = full_attention, index: int = 0, layout: tuple = ()):
    """One block of a Qwen2-VL-style ViT (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) over one image's patches x [P, dim]: the
    checkpoint's own norms, qkv/proj and MLP; only the attention glue is written out (no cu_seqlens splits):
    `attention(index, q, k, v, scaling, *layout)` -> [P, H, D] from q, k, v [P, H, D] with the rotary applied
    (default: full attention over the one image; Qwen2.5-VL's windows take their layout inputs)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = x.shape[0]
    attn = blk.attn
    q, k, v = attn.qkv(blk.norm1(x)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, rotary_cos, rotary_sin)
    x = x + attn.proj(attention(index, q, k, v, attn.scaling, *layout).reshape(n, -1))
    return x + blk.mlp(blk.norm2(x))


def patch_matrix(patch_embed):
    """Conv3d with kernel == stride over pre-flattened patches is a MatMul: its weight as [embed, C*T*p*p]."""
    from torch import nn

    w = patch_embed.proj.weight.detach()
    return nn.Parameter(w.reshape(w.shape[0], -1).clone(), requires_grad=False)


def vision_encoder_module(visual, attention: Callable[..., Any] = full_attention):
    """Qwen2-VL's ViT for one image: pixel_values [P, C*T*p*p], rotary cos/sin [P, head_dim] (+ any layout
    inputs `attention` takes, see `vit_block`) -> hidden [P, embed_dim]."""
    from torch import nn

    class VisionEncoder(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.blocks = visual.blocks
            self.patch_weight = patch_matrix(visual.patch_embed)

        def forward(self, pixel_values, rotary_cos, rotary_sin, *layout):
            x = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight.t()
            for i, blk in enumerate(self.blocks):
                x = vit_block(blk, x, rotary_cos, rotary_sin, attention, i, layout)
            return x

    return VisionEncoder(visual)


def _example_grid(patches: Dim, merge: int, accept: Callable[[int, int], bool] = lambda h, w: True) -> tuple[int, int]:
    """A non-square patch grid (sides multiples of `merge`) with a patch count inside the declared
    num_patches range (torch.export rejects a traced size outside it) and off its opt value, as close
    to 6x10 as that range allows (among the grids `accept` takes)."""
    sides = range(merge, patches.max // merge + 1, merge)
    ok = [(abs(h * w - 60) + abs(h - 6), h, w) for h in sides for w in sides
          if h < w and patches.min <= h * w <= patches.max and h * w != patches.opt and accept(h, w)]
    if not ok:
        raise ValueError(f"no example image grid fits num_patches in [{patches.min}, {patches.max}]")
    _, h, w = min(ok)
    return h, w


class Qwen2VLAdapter(Qwen2VLReference, FamilyAdapter):
    """Qwen2-VL's adapter; Qwen2.5-VL's and Qwen3-VL's (families/qwen2_5_vl, qwen3_vl) subclass it and override
    the hooks marked below."""

    model_class = "Qwen2VLForConditionalGeneration"
    config_class = "Qwen2VLConfig"  # transformers classes of a synthetic checkpoint
    special_tokens = SPECIAL_TOKENS
    chat_template = CHAT_TEMPLATE

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def synthetic_parts(cls, syn: dict[str, Any], attn_implementation: str | None = None):
        """A fresh checkpoint from a `[source.synthetic]` table: (model, tokenizer, image processor,
        generation config) — the in-repo BPE tokenizer with the family's special tokens and chat template.
        `init_std` (default 0.08) redraws every weight matrix from N(0, init_std); 0 keeps transformers'
        own initialization (scripts/train_shapes.py starts training from it)."""
        import torch
        import transformers

        from transformers import GenerationConfig, PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = train_bpe_tokenizer(list(cls.special_tokens), int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in cls.special_tokens}
        text = dict(syn["text_config"])
        # the embedding has at least the tokenizer's rows, padded like real checkpoints do, or the
        # recipe's vocab_size (a benchmark recipe asks for a real model's 151,936 rows)
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        config = getattr(transformers, cls.config_class)(
            text_config=text,
            vision_config=dict(syn["vision_config"]),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=tie,
        )
        config.text_config.tie_word_embeddings = tie
        torch.manual_seed(int(syn.get("seed", 0)))
        model_cls = getattr(transformers, cls.model_class)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        if init_std:
            # A wider init than HF's 0.02 so random logits are well separated: greedy parity between
            # PyTorch and ONNX Runtime must not hinge on near-ties of an untrained model.
            with torch.no_grad():
                gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
                for name, p in model.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        generation = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            do_sample=False,
        )
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = cls.chat_template
        return model, tokenizer, Qwen2VLImageProcessorPil(**dict(syn.get("preprocessor", {}))), generation

    # -- declarations --------------------------------------------------------------------------
    vision_width = "embed_dim"  # the vision config's name for the ViT width (Qwen3-VL: hidden_size)

    def _sizes(self, model) -> dict[str, int]:
        vc = model.config.vision_config
        width = getattr(vc, self.vision_width)
        return dict(
            patch_dim=vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
            embed_dim=width,
            v_head_dim=width // vc.num_heads,
            merge=vc.spatial_merge_size,
        )

    def _patches(self, model_dir: Path, merge: int) -> Dim:
        """num_patches of one image: whole merge blocks, within the preprocessor's pixel limits."""
        pre = self._preprocessor(model_dir)
        unit = pre.patch_size * pre.merge_size
        m2 = merge**2
        max_patches = (pre.max_pixels // unit**2) * m2  # smart_resize keeps h*w <= max_pixels
        min_patches = max(m2, (pre.min_pixels // unit**2) * m2)
        opt_patches = min(max_patches, max(min_patches, 16 * m2))
        return Dim("num_patches", min_patches, opt_patches, max_patches, multiple=m2)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import embed_spec

        s = self._sizes(model)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        return [*self._vision_specs(model, s, self._patches(model_dir, s["merge"])), embed_spec(tc.hidden_size, cache),
                self._decoder_spec(model, cache)]

    patch_order = "merge-block order"  # of the vision encoder's patch rows (Qwen2.5-VL: window order)

    def _vision_specs(self, model, s: dict[str, int], patches: Dim) -> list[ComponentSpec]:
        """(hook) The vision_encoder and projector declarations."""
        f, hidden = "float32", model.config.text_config.hidden_size
        order = self.patch_order
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, ("num_patches", s["patch_dim"]), f"one image's patches, {order}"),
                    TensorSpec("rotary_cos", f, ("num_patches", s["v_head_dim"]), f"2D rotary cos table, {order}"),
                    TensorSpec("rotary_sin", f, ("num_patches", s["v_head_dim"]), f"2D rotary sin table, {order}"),
                ),
                outputs=(TensorSpec("vision_hidden", f, ("num_patches", s["embed_dim"]), order),),
                dims={"num_patches": patches},
                doc="patch embedding + ViT blocks, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, ("num_patches", s["embed_dim"])),),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", hidden)),),
                dims={"num_patches": patches},
                doc="PatchMerger: LayerNorm, 2x2 merge, MLP",
            ),
        ]

    def _decoder_spec(self, model, cache) -> ComponentSpec:
        """(hook) The decoder declaration."""
        from ..decoder import decoder_spec

        tc = model.config.text_config
        return decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="mrope",
                            doc="Qwen2 decoder with M-RoPE over a static KV cache (capacity = context)")

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import decoder_example
        from ..parts import EmbedTokens

        s = self._sizes(model)
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        grid = self.example_grid(specs["vision_encoder"], s)
        lm = model.model.language_model
        vocab = model.config.text_config.vocab_size
        return [
            *self._vision_components(model, specs, s, grid, g),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(), {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], self._decoder_module(model, specs["decoder"]).eval(), decoder_example(specs["decoder"])),
        ]

    def example_grid(self, spec: ComponentSpec, s: dict[str, int]) -> tuple[int, int]:
        """(hook) The patch grid of the traced example image: one the recipe's pixel range allows (about 6x10
        patches), off the opt size."""
        return _example_grid(spec.dims["num_patches"], s["merge"])

    def _vision_components(self, model, specs: dict[str, ComponentSpec], s: dict[str, int], grid: tuple[int, int], g) -> list[ExportComponent]:
        """(hook) vision_encoder and projector with example inputs for an image of `grid` patches."""
        import torch

        from ..parts import ModuleCall

        gh, gw = grid
        n = gh * gw
        cos, sin = vision_rotary_tables(gh, gw, s["merge"], s["v_head_dim"], _vision_theta(model.config.vision_config))
        return [
            ExportComponent(
                specs["vision_encoder"],
                vision_encoder_module(model.model.visual).eval(),
                {"pixel_values": torch.randn(n, s["patch_dim"], generator=g), "rotary_cos": torch.from_numpy(cos), "rotary_sin": torch.from_numpy(sin)},
            ),
            ExportComponent(specs["projector"], ModuleCall(model.model.visual.merger).eval(), {"vision_hidden": torch.randn(n, s["embed_dim"], generator=g)}),
        ]

    def _decoder_module(self, model, spec: ComponentSpec):
        """(hook) The decoder's torch module: the generic static-cache decoder over the text stack."""
        from ..decoder import StaticCacheDecoder

        return StaticCacheDecoder(spec, model.model.language_model, model.lm_head)

    # -- runtime configuration -----------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> Qwen2VLImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return Qwen2VLImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        s = self._sizes(model)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "vision": {
                "head_dim": s["v_head_dim"],
                "rope_theta": _vision_theta(vc),
                "spatial_merge_size": vc.spatial_merge_size,
            },
            "text": {
                "hidden_size": tc.hidden_size,
                "num_layers": tc.num_hidden_layers,
                "num_kv_heads": tc.num_key_value_heads,
                "head_dim": head_dim,
                "vocab_size": tc.vocab_size,
                "mrope_section": list(tc.rope_parameters.get("mrope_section", [])),
                "rope_theta": tc.rope_parameters.get("rope_theta"),
            },
            "tokens": {
                "image_token_id": cfg.image_token_id,
                "video_token_id": cfg.video_token_id,
                "vision_start_token_id": cfg.vision_start_token_id,
                "vision_end_token_id": cfg.vision_end_token_id,
            },
        }


def _vision_theta(vc) -> float:
    rp = getattr(vc, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", 10000.0))

