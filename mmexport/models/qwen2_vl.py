"""Qwen2-VL (Method A: image patches become token embeddings for an unmodified decoder).

Components, each exported on its own:
  vision_encoder  one image's flat patch sequence -> ViT hidden states. Patch embedding + blocks.
                  The 2D rotary tables are computed by the runtime and passed in; one image per call
                  (full attention inside the image), so no data-dependent splits and no dense mask
                  across images. The runtime loops over images.
  projector       PatchMerger: LayerNorm, 2x2 spatial merge, MLP -> LLM width.
  embed_tokens    token ids -> embeddings.
  decoder         inputs_embeds + M-RoPE position ids [3, B, S] + a static KV cache (mask + keys/values
                  per layer) -> last-position logits + this step's keys/values.

The wrappers call the checkpoint's own modules (norms, projections, MLPs, HF's rotary helpers) and
write out only the attention glue, so the traced graph has no Python control flow on data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..recipes import Recipe
from ..spec import ComponentSpec, Dim, TensorSpec
from . import register
from .base import ExportComponent, FamilyAdapter, StaticKVCache, example_batch
from .synthetic import train_bpe_tokenizer

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


def _torch():
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress belongs to mmexport's own stage display
    return torch


# ---------------------------------------------------------------------------------------------
# torch wrappers (built lazily so importing this module needs no torch)
# ---------------------------------------------------------------------------------------------
def _wrappers():
    torch = _torch()
    from torch import nn
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

    from .torch_ops import EmbedTokens, attend_with_cache, cache_biases

    class VisionEncoder(nn.Module):
        """pixel_values [P, C*T*p*p], rotary cos/sin [P, head_dim] -> hidden [P, embed_dim] (one image)."""

        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.blocks = visual.blocks
            pe = visual.patch_embed
            # Conv3d with kernel == stride over pre-flattened patches is a MatMul; trace it as one.
            self.patch_weight = nn.Parameter(pe.proj.weight.detach().reshape(pe.embed_dim, -1).clone(), requires_grad=False)

        def forward(self, pixel_values, rotary_cos, rotary_sin):
            x = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight.t()
            n = x.shape[0]
            for blk in self.blocks:
                attn = blk.attn
                h = blk.norm1(x)
                q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, rotary_cos, rotary_sin)
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, P, D]
                w = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
                w = torch.softmax(w.float(), dim=-1).to(q.dtype)
                o = torch.matmul(w, v).transpose(0, 1).reshape(n, -1)  # [P, H*D]
                x = x + attn.proj(o)
                x = x + blk.mlp(blk.norm2(x))
            return x

    class Projector(nn.Module):
        """vision hidden [P, embed_dim] -> image embeddings [P / merge^2, hidden] (HF's PatchMerger)."""

        def __init__(self, merger):
            super().__init__()
            self.merger = merger

        def forward(self, vision_hidden):
            return self.merger(vision_hidden)

    class Decoder(nn.Module):
        """Qwen2 decoder with M-RoPE over a static, preallocated KV cache; last-position logits only.

        The cache (`cache_key_i/cache_value_i [B, kv_heads, cache_len, head_dim]`: the whole preallocated
        buffer, or zero slots while it is empty) is an input the runtime owns and never copies:
        `cache_mask [B, cache_len]` marks its filled slots. The graph returns only
        the new tokens' keys/values (`key_i/value_i [B, kv_heads, seq_len, head_dim]`), which the runtime
        writes into the cache in place. Attention runs over [cache | new] without concatenating the
        cache: scores against both are joined (small), softmax in fp32, then split again.
        """

        def __init__(self, lm, lm_head):
            super().__init__()
            self.lm = lm
            self.lm_head = lm_head

        def forward(self, inputs_embeds, position_ids, cache_mask, *cache):
            h = inputs_embeds
            bsz, seq = h.shape[0], h.shape[1]
            cos, sin = self.lm.rotary_emb(h, position_ids)  # M-RoPE sections, [B, S, D]
            cache_bias, new_bias = cache_biases(cache_mask, seq)
            new_kv = []
            for n, layer in enumerate(self.lm.layers):
                att = layer.self_attn
                residual = h
                x = layer.input_layernorm(h)
                q = att.q_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                k = att.k_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                v = att.v_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                new_kv += [k, v]
                o = attend_with_cache(q, k, v, cache[2 * n], cache[2 * n + 1], cache_bias, new_bias, att.scaling, att.num_key_value_groups)
                h = residual + att.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            h = self.lm.norm(h[:, -1:, :])
            return (self.lm_head(h), *new_kv)

    return VisionEncoder, Projector, EmbedTokens, Decoder


# ---------------------------------------------------------------------------------------------
def _example_grid(patches: Dim, merge: int) -> tuple[int, int]:
    """A non-square patch grid (sides multiples of `merge`) with a patch count inside the declared
    num_patches range (torch.export rejects a traced size outside it) and off its opt value, as close
    to 6x10 as that range allows."""
    sides = range(merge, patches.max // merge + 1, merge)
    ok = [(abs(h * w - 60) + abs(h - 6), h, w) for h in sides for w in sides
          if h < w and patches.min <= h * w <= patches.max and h * w != patches.opt]
    if not ok:
        raise ValueError(f"no example image grid fits num_patches in [{patches.min}, {patches.max}]")
    _, h, w = min(ok)
    return h, w


# host-side helpers shared by export examples and verify (numpy; mirror the runtime)
# ---------------------------------------------------------------------------------------------
def vision_rotary(grid_h: int, grid_w: int, merge: int, head_dim: int, theta: float):
    """Rotary cos/sin [h*w, head_dim] for one image, patch order = merge-block order (as HF)."""
    from ..runtime.qwen2_vl import vision_rotary_tables

    return vision_rotary_tables(grid_h, grid_w, merge, head_dim, theta)


@register("qwen2_vl")
class Qwen2VLAdapter(FamilyAdapter):
    model_types = ("qwen2_vl",)

    # -- checkpoints ---------------------------------------------------------------------------
    def make_synthetic(self, recipe: Recipe, out_dir: Path) -> None:
        for part in self.synthetic_parts(recipe.synthetic or {}):
            part.save_pretrained(out_dir)

    @staticmethod
    def synthetic_parts(syn: dict[str, Any], attn_implementation: str | None = None):
        """A fresh checkpoint from a `[source.synthetic]` table: (model, tokenizer, image processor,
        generation config) — the in-repo BPE tokenizer with Qwen2-VL's special tokens and chat template.
        `init_std` (default 0.08) redraws every weight matrix from N(0, init_std); 0 keeps transformers'
        own initialization (scripts/train_shapes.py starts training from it)."""
        torch = _torch()
        from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = train_bpe_tokenizer(SPECIAL_TOKENS, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        text = dict(syn["text_config"])
        # the embedding has at least the tokenizer's rows, padded like real checkpoints do, or the
        # recipe's vocab_size (a benchmark recipe asks for a real model's 151,936 rows)
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        config = Qwen2VLConfig(
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
        model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32).eval()
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
        tokenizer.chat_template = CHAT_TEMPLATE
        return model, tokenizer, Qwen2VLImageProcessorPil(**dict(syn.get("preprocessor", {}))), generation

    def load(self, model_dir: Path):
        self.check_checkpoint(model_dir)
        torch = _torch()
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
        return model.eval()

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _sizes(model) -> dict[str, int]:
        vc, tc = model.config.vision_config, model.config.text_config
        return dict(
            patch_dim=vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
            embed_dim=vc.embed_dim,
            v_head_dim=vc.embed_dim // vc.num_heads,
            merge=vc.spatial_merge_size,
            hidden=tc.hidden_size,
            vocab=tc.vocab_size,
            layers=tc.num_hidden_layers,
            kv_heads=tc.num_key_value_heads,
            head_dim=tc.hidden_size // tc.num_attention_heads,
        )

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        s = self._sizes(model)
        pre = self._preprocessor(model_dir)
        unit = pre.patch_size * pre.merge_size
        m2 = s["merge"] ** 2
        max_patches = (pre.max_pixels // unit**2) * m2  # smart_resize keeps h*w <= max_pixels
        min_patches = max(m2, (pre.min_pixels // unit**2) * m2)
        opt_patches = min(max_patches, max(min_patches, 16 * m2))
        ctx = recipe.limits.max_context
        patches = Dim("num_patches", min_patches, opt_patches, max_patches, multiple=m2)
        seq = Dim("seq_len", 1, min(64, ctx), ctx)
        f = "float32"
        kv = StaticKVCache(list(range(s["layers"])), s["kv_heads"], s["head_dim"], ctx, max_batch=recipe.limits.max_batch)
        batch = kv.batch_dim()
        mask_in, cache_in = kv.inputs()
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, ("num_patches", s["patch_dim"]), "one image's patches, merge-block order"),
                    TensorSpec("rotary_cos", f, ("num_patches", s["v_head_dim"]), "2D rotary cos table"),
                    TensorSpec("rotary_sin", f, ("num_patches", s["v_head_dim"]), "2D rotary sin table"),
                ),
                outputs=(TensorSpec("vision_hidden", f, ("num_patches", s["embed_dim"])),),
                dims={"num_patches": patches},
                doc="patch embedding + ViT blocks, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, ("num_patches", s["embed_dim"])),),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", s["hidden"])),),
                dims={"num_patches": patches},
                doc="PatchMerger: LayerNorm, 2x2 merge, MLP",
            ),
            ComponentSpec(
                "embed_tokens",
                inputs=(TensorSpec("input_ids", "int64", ("batch", "seq_len")),),
                outputs=(TensorSpec("inputs_embeds", f, ("batch", "seq_len", s["hidden"])),),
                dims={"batch": batch, "seq_len": seq},
            ),
            ComponentSpec(
                "decoder",
                inputs=(
                    TensorSpec("inputs_embeds", f, ("batch", "seq_len", s["hidden"])),
                    TensorSpec("position_ids", "int64", (3, "batch", "seq_len"), "M-RoPE t/h/w positions"),
                    *mask_in,
                    *cache_in,
                ),
                outputs=(TensorSpec("logits", f, ("batch", 1, s["vocab"]), "last position only"), *kv.outputs()),
                dims={"batch": batch, "seq_len": seq, **kv.dims()},
                profiles=kv.profiles(),
                doc="Qwen2 decoder with M-RoPE over a static KV cache (capacity = context)",
            ),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        torch = _torch()
        VisionEncoder, Projector, EmbedTokens, Decoder = _wrappers()
        s = self._sizes(model)
        vc = model.config.vision_config
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        # example shapes: an image of about 6x10 patches (15 tokens) that the recipe's pixel range allows,
        # a 7-token step after 5 (row 1: 4) cached tokens
        gh, gw = _example_grid(specs["vision_encoder"].dims["num_patches"], s["merge"])
        n = gh * gw
        cos, sin = vision_rotary(gh, gw, s["merge"], s["v_head_dim"], _vision_theta(vc))
        seq, ctx = 7, recipe.limits.max_context
        # batch rows (2 when the build batches: sizes 1 would be specialized) with their own cache
        # lengths and positions: row b has 5 - b cached tokens
        B = example_batch(specs["decoder"].dims["batch"])
        pasts = [5 - b for b in range(B)]
        pos = torch.stack([torch.arange(p, p + seq) for p in pasts]).view(1, B, seq).expand(3, B, seq).contiguous()
        mask = torch.zeros(B, ctx, dtype=torch.int64)
        for b, p in enumerate(pasts):
            mask[b, :p] = 1
        dec_example: dict[str, Any] = {
            "inputs_embeds": torch.randn(B, seq, s["hidden"], generator=g),
            "position_ids": pos,
            "cache_mask": mask,
        }
        for i in range(s["layers"]):
            for kind in ("key", "value"):
                dec_example[f"cache_{kind}_{i}"] = torch.randn(B, s["kv_heads"], ctx, s["head_dim"], generator=g)
        lm = model.model.language_model
        return [
            ExportComponent(
                specs["vision_encoder"],
                VisionEncoder(model.model.visual).eval(),
                {
                    "pixel_values": torch.randn(n, s["patch_dim"], generator=g),
                    "rotary_cos": torch.from_numpy(cos),
                    "rotary_sin": torch.from_numpy(sin),
                },
            ),
            ExportComponent(specs["projector"], Projector(model.model.visual.merger).eval(), {"vision_hidden": torch.randn(n, s["embed_dim"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(), {"input_ids": torch.randint(0, s["vocab"], (B, seq), generator=g)}),
            ExportComponent(specs["decoder"], Decoder(lm, model.lm_head).eval(), dec_example),
        ]

    # -- runtime configuration -----------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path):
        from ..runtime.image import Qwen2VLImageParams

        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return Qwen2VLImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        s = self._sizes(model)
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
                "head_dim": s["head_dim"],
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


# ---------------------------------------------------------------------------------------------
# PyTorch references for verify (transformers' own tokenizer, image processor and model)
# ---------------------------------------------------------------------------------------------
def _reference_inputs(model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """What Qwen2VLProcessor would produce, built from transformers' tokenizer and PIL image processor.

    (Qwen2VLProcessor itself insists on a video processor, which needs torchvision; its image path is
    exactly: process images, repeat each <|image_pad|> grid.prod() // merge**2 times, tokenize.)
    """
    torch = _torch()
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out: dict[str, Any] = {}
    if images:
        ip = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        iv = ip(images=images, return_tensors="pt")
        merge = ip.merge_size**2
        parts = text.split("<|image_pad|>")
        counts = [int(g.prod()) // merge for g in iv["image_grid_thw"]]
        text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
        out["pixel_values"] = iv["pixel_values"]
        out["image_grid_thw"] = iv["image_grid_thw"]
    enc = tok(text, return_tensors="pt")
    out["input_ids"] = enc["input_ids"]
    out["attention_mask"] = enc["attention_mask"]
    out["mm_token_type_ids"] = (enc["input_ids"] == model.config.image_token_id).to(torch.int32)
    return out


def _reference_outputs(model, inputs: dict[str, Any]) -> dict[str, Any]:
    torch = _torch()
    ref: dict[str, Any] = {"input_ids": inputs["input_ids"][0].numpy()}
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.model.get_input_embeddings()(ids)
        ref["embed_tokens"] = embeds.numpy()
        if "pixel_values" in inputs:
            grid = inputs["image_grid_thw"]
            vis = model.model.visual(inputs["pixel_values"], grid_thw=grid)
            sizes = grid.prod(-1).tolist()
            merge = model.config.vision_config.spatial_merge_size ** 2
            ref["pixel_values"] = [p.numpy() for p in torch.split(inputs["pixel_values"], sizes)]
            ref["vision_encoder"] = [h.numpy() for h in torch.split(vis.last_hidden_state, sizes)]
            ref["projector"] = [h.numpy() for h in torch.split(vis.pooler_output, [s // merge for s in sizes])]
            mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, vis.pooler_output)
            pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grid)
            ref["position_ids"] = pos.numpy()
        ref["decoder_inputs_embeds"] = embeds.numpy()
        logits = model(**inputs).logits
        ref["logits"] = logits[0, -1].numpy()
    return ref


def _reference_generate(model, inputs: dict[str, Any], n: int) -> list[int]:
    torch = _torch()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


Qwen2VLAdapter.reference_inputs = staticmethod(_reference_inputs)
Qwen2VLAdapter.reference_outputs = staticmethod(_reference_outputs)
Qwen2VLAdapter.reference_generate = staticmethod(_reference_generate)


def _verify_components(pipe, prep, ref: dict[str, Any], case: str, tol_for) -> list:
    """Each exported component on the reference's own inputs, so errors do not compound."""
    import numpy as np

    from ..runtime.pipeline import KVCache
    from ..verify import compare, component_tol

    out = []
    for i, img in enumerate(prep.images):
        tag = f"{case}[{i}]"
        out.append(compare(tag, "preprocess", img.pixel_values, ref["pixel_values"][i], 1e-5, 0.999999))
        hidden = pipe.runners["vision_encoder"].infer(pipe.family.vision_feeds(img))["vision_hidden"]
        out.append(compare(tag, "vision_encoder", hidden, ref["vision_encoder"][i], *component_tol(tol_for("vision_encoder"))))
        proj = pipe.runners["projector"].infer({"vision_hidden": ref["vision_encoder"][i].astype(np.float32)})["image_embeds"]
        out.append(compare(tag, "projector", proj, ref["projector"][i], *component_tol(tol_for("projector"))))
    out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
    logits = pipe.decoder_step(ref["decoder_inputs_embeds"].astype(np.float32), pipe.family.prefill_feeds(prep, None), KVCache(pipe.specs["decoder"]))
    t = tol_for("decoder")
    out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
    return out


Qwen2VLAdapter.verify_components = staticmethod(_verify_components)
