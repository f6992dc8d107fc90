"""Aria (Method A), export side.

Components, each exported on its own:
  vision_encoder  one image's crops [crops, 3, S, S] (S = the processor's max_image_size) -> the Idefics3
                  vision tower's hidden states at `vision_feature_layer` [crops, P, width]. The patch mask and
                  the position-embedding rows (bucketed fractional coordinates, Idefics3VisionEmbeddings) come
                  from the host; attention masks padding patches as keys (no boolean indexing, no NonZero).
  projector       AriaProjector: a fixed number of learned queries per crop (projector_patch_to_query_dict[P])
                  cross-attend to the crop's real patches, then LayerNorm + MLP -> [crops x queries, hidden].
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder (families/decoder.py) over Aria's text stack: its attention swapped for
                  the static-cache one and its MoE experts for the dense ones (families/experts.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import AriaImageParams, patch_mask, patch_position_ids, preprocess_aria
from .reference import AriaReference, processor_size_conversion

IMAGE_TOKEN = "<|img|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", IMAGE_TOKEN, "<pad>"]

# The chat template transformers' conversion script writes into rhymes-ai/Aria's HF checkpoint, verbatim
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def attend(q, k, v, scaling: float, bias):
    """softmax(q·kᵀ · scaling + bias) · v, the softmax in fp32 (bias: 0 = attend, very negative = masked)."""
    import torch

    w = torch.matmul(q, k.transpose(-1, -2)) * scaling
    return torch.matmul(torch.softmax(w.float() + bias, dim=-1).to(q.dtype), v)


def key_bias(patch_mask):
    """[crops, P] (1 = real patch) -> additive fp32 bias [crops, 1, 1, P] over the keys."""
    import torch

    real = patch_mask[:, None, None, :] > 0
    return torch.where(real, torch.zeros((), dtype=torch.float32), torch.full((), torch.finfo(torch.float32).min))


def vision_encoder_module(tower, layers: int):
    """Idefics3's vision tower over a batch of crops: patch conv + position rows from the host, `layers` encoder
    layers (the checkpoint's own norms, projections and MLPs; only the attention glue is written out)."""
    from torch import nn

    class VisionEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = tower.embeddings
            self.layers = tower.encoder.layers[:layers]

        def forward(self, pixel_values, patch_position_ids, patch_mask):
            emb = self.embeddings
            x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
            x = x + emb.position_embedding(patch_position_ids)
            bias = key_bias(patch_mask)
            b, n, _ = x.shape
            for layer in self.layers:
                a = layer.self_attn
                h = layer.layer_norm1(x)
                q, k, v = (p(h).view(b, n, a.num_heads, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
                x = x + a.out_proj(attend(q, k, v, a.scale, bias).transpose(1, 2).reshape(b, n, -1))
                x = x + layer.mlp(layer.layer_norm2(x))
            return x

    return VisionEncoder()


def projector_module(projector, num_queries: int):
    """AriaProjector for crops of a fixed patch count: its `num_queries` learned queries attend to each crop's real
    patches (nn.MultiheadAttention's own weights, written out), then LayerNorm + MLP; -> [crops x queries, hidden]."""
    from torch import nn
    from torch.nn import functional as F

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = projector

        def forward(self, vision_hidden, patch_mask):
            p, ca = self.p, self.p.cross_attn
            mha = ca.multihead_attn
            heads, width = mha.num_heads, mha.embed_dim
            hd = width // heads
            b, n, _ = vision_hidden.shape
            wq, wk, wv = mha.in_proj_weight.chunk(3)
            bq, bk, bv = mha.in_proj_bias.chunk(3)
            queries = ca.q_proj(ca.layer_norm(p.query[:num_queries]))  # [Q, width], the same for every crop
            q = F.linear(queries, wq, bq).view(1, num_queries, heads, hd).transpose(1, 2)
            kv = ca.layer_norm_kv(vision_hidden)
            k = F.linear(ca.k_proj(kv), wk, bk).view(b, n, heads, hd).transpose(1, 2)
            v = F.linear(ca.v_proj(kv), wv, bv).view(b, n, heads, hd).transpose(1, 2)
            o = attend(q, k, v, hd ** -0.5, key_bias(patch_mask)).transpose(1, 2).reshape(b, num_queries, width)
            o = ca.linear(mha.out_proj(o))
            out = p.feed_forward(p.layer_norm(o))
            return out.reshape(b * num_queries, out.shape[-1])

    return Projector()


class AriaAdapter(AriaReference, FamilyAdapter):
    model_class = "AriaForConditionalGeneration"

    # -- checkpoints ---------------------------------------------------------------------------
    def synthetic_parts(self, syn: dict[str, Any]):
        """(model, tokenizer, image processor, generation config) of a seeded tiny Aria."""
        import torch
        from transformers import AriaConfig, AriaForConditionalGeneration, AriaProcessor, GenerationConfig, PreTrainedTokenizerFast
        from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

        tok = train_bpe_tokenizer(SPECIAL_TOKENS, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        text = dict(syn["text_config"])
        text.update(vocab_size=max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64),
                    bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"])
        vision = {"model_type": "idefics3_vision", **dict(syn["vision_config"])}
        config = AriaConfig(vision_config=vision, text_config=text, image_token_index=ids[IMAGE_TOKEN],
                            vision_feature_layer=int(syn.get("vision_feature_layer", -1)),
                            projector_patch_to_query_dict={int(k): int(v) for k, v in syn["patch_to_query"].items()})
        seed = int(syn.get("seed", 0))
        torch.manual_seed(seed)
        model = AriaForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            # wider than HF's 0.02 init, so random logits are well separated (greedy parity must not hinge on ties)
            # (at most 1/sqrt(fan-in): the 70x70x3 patch convolution would otherwise blow the residual stream up)
            gen = torch.Generator().manual_seed(seed)
            for name, prm in model.named_parameters():
                if prm.dim() >= 2:
                    fan_in = prm[0].numel() if prm.dim() != 3 else prm.shape[1]  # experts [E, in, out]: fan-in is dim 1
                    std = min(float(syn.get("init_std", 0.08)), fan_in ** -0.5)
                    prm.copy_(torch.randn(prm.shape, generator=gen) * std)
        generation = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<pad>"],
                                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                            extra_special_tokens={"image_token": IMAGE_TOKEN})
        tokenizer.chat_template = CHAT_TEMPLATE
        patch = int(vision["patch_size"])
        q = config.projector_patch_to_query_dict
        # AriaProcessor counts <|img|> tokens by crop size (size_conversion, in processor_config.json): the
        # projector's query counts of 490- and 980-pixel crops
        sizes = {s: q[(s // patch) ** 2] for s in (490, 980) if (s // patch) ** 2 in q}
        ip = AriaImageProcessorPil(**dict(syn.get("preprocessor", {})))
        # the processor writes processor_config.json (size_conversion, and the image processor nested in it, as
        # transformers 5 saves it); the image processor alone writes preprocessor_config.json, as the Hub checkpoint has
        return model, AriaProcessor(image_processor=ip, tokenizer=tokenizer, size_conversion=sizes), ip, generation

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> AriaImageParams:
        p, nested = model_dir / "preprocessor_config.json", model_dir / "processor_config.json"
        if p.is_file():
            return AriaImageParams.from_preprocessor_config(json.loads(p.read_text()))
        if nested.is_file() and isinstance(json.loads(nested.read_text()).get("image_processor"), dict):
            return AriaImageParams.from_preprocessor_config(json.loads(nested.read_text())["image_processor"])
        raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")

    def _sizes(self, model, model_dir: Path) -> dict[str, Any]:
        cfg, pre = model.config, self._preprocessor(model_dir)
        vc = cfg.vision_config
        side = pre.max_image_size // vc.patch_size
        patches = side * side
        q = {int(k): int(v) for k, v in cfg.projector_patch_to_query_dict.items()}
        if patches not in q:
            raise UserError(f"{model_dir}: crops of {pre.max_image_size} pixels make {patches} patches of {vc.patch_size}; "
                            f"the projector pools {', '.join(map(str, sorted(q)))} (projector_patch_to_query_dict)")
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise UserError(f"{model_dir}: vision_feature_layer {layer!r}: only one layer is supported")
        n_layers = vc.num_hidden_layers
        return dict(size=pre.max_image_size, patches=patches, queries=q[patches], width=vc.hidden_size,
                    layers=layer % (n_layers + 1), max_crops=pre.max_crops, hidden=cfg.text_config.hidden_size)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        s = self._sizes(model, model_dir)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        f, S, P = "float32", s["size"], s["patches"]
        crops = Dim("crops", 1, 1, max(2, s["max_crops"]))
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, ("crops", 3, S, S), "one image's crops, padded bottom/right"),
                    TensorSpec("patch_position_ids", "int64", ("crops", P), "position-embedding row of each patch (0 for padding)"),
                    TensorSpec("patch_mask", "int64", ("crops", P), "1 = the patch holds image pixels"),
                ),
                outputs=(TensorSpec("vision_hidden", f, ("crops", P, s["width"]), f"after {s['layers']} encoder layers"),),
                dims={"crops": crops},
                doc="Idefics3 vision tower over one image's crops (padding patches masked as keys)",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, ("crops", P, s["width"])),
                        TensorSpec("patch_mask", "int64", ("crops", P), "1 = the patch holds image pixels")),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", s["hidden"]), f"{s['queries']} per crop"),),
                dims={"crops": crops},
                doc=f"AriaProjector: {s['queries']} learned queries per crop cross-attend to its patches, LayerNorm, MLP",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         doc="Aria's MoE decoder over a static KV cache (experts dense: all experts on every token)"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import numpy as np
        import torch
        from PIL import Image

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        s = self._sizes(model, model_dir)
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        # two crops of a real (non-square) image's masks: padding patches in the traced example
        pre = self._preprocessor(model_dir)
        vc = model.config.vision_config
        masks = [patch_mask(preprocess_aria(Image.new("RGB", (w, h)), pre).pixel_mask, vc.patch_size)[0] for h, w in ((300, 700), (640, 410))]
        m = np.stack(masks)
        P = s["patches"]
        pos = torch.from_numpy(patch_position_ids(m, vc.image_size // vc.patch_size))
        mask = torch.from_numpy(m.reshape(2, P).astype(np.int64))
        lm = model.model.language_model
        vocab = model.config.text_config.vocab_size
        return [
            ExportComponent(specs["vision_encoder"], vision_encoder_module(model.model.vision_tower, s["layers"]).eval(),
                            {"pixel_values": torch.randn(2, 3, s["size"], s["size"], generator=g), "patch_position_ids": pos, "patch_mask": mask}),
            ExportComponent(specs["projector"], projector_module(model.model.multi_modal_projector, s["queries"]).eval(),
                            {"vision_hidden": torch.randn(2, P, s["width"], generator=g), "patch_mask": mask}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], lm, model.lm_head).eval(), decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        s = self._sizes(model, model_dir)
        conv = processor_size_conversion(model_dir)
        if conv is not None and conv.get(s["size"]) != s["queries"]:
            raise UserError(f"{model_dir}: processor_config.json size_conversion gives {conv.get(s['size'])} <|img|> tokens per "
                            f"{s['size']}-pixel crop, but the projector pools {s['queries']} queries (projector_patch_to_query_dict)")
        vc, tc = cfg.vision_config, cfg.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "image_token": IMAGE_TOKEN,
            "vision": {
                "patch_size": vc.patch_size,
                "num_patches_per_side": vc.image_size // vc.patch_size,
                "patch_to_query": {str(k): int(v) for k, v in cfg.projector_patch_to_query_dict.items()},
            },
            "text": {
                "hidden_size": tc.hidden_size,
                "num_layers": tc.num_hidden_layers,
                "num_kv_heads": tc.num_key_value_heads,
                "head_dim": head_dim,
                "vocab_size": tc.vocab_size,
                "moe_num_experts": tc.moe_num_experts,
                "moe_topk": tc.moe_topk,
                "experts": "dense",
            },
            "tokens": {"image_token_id": int(cfg.image_token_id)},
        }
