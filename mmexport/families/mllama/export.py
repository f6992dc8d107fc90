"""Llama 3.2 Vision / mllama (Method B: the decoder attends to image features through added
cross-attention layers; the prompt keeps a single `<|image|>` token per image).

Components, each exported on its own:
  vision_encoder  one image's tiles [max_tiles, 3, H, W] + aspect-ratio id and tile mask -> features
                  [max_tiles, P, vision_output_dim]: patch conv, pre-tile/position/tile embeddings, the local
                  transformer (whose intermediate layers are kept), the gated global transformer. All shapes
                  static (padding tiles are masked exactly as transformers masks them), one image per call.
  projector       multi_modal_projector: Linear vision_output_dim -> text hidden, [max_tiles, P, hidden].
  cross_kv        the projected states of every image of the request [tiles, P, hidden] -> the keys/values of
                  every cross-attention layer [1, kv_heads, tiles, P, head_dim] (k_proj + k_norm, v_proj).
                  Runs once per request; no decode step touches vision or these projections again.
  embed_tokens    ids -> embeddings (the <|image|> token is an ordinary row of the table).
  decoder         the generic decoder's self-attention layers over the static KV cache and cross-attention layers that
                  read the cross K/V inputs, masked per text token and tile by `cross_attention_mask [B, S, tiles]`.
                  `has_image [B]` = 0 turns every cross-attention layer into the identity, which is what
                  transformers does for a text-only prompt (it skips those layers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import LLAMA3_SPLIT, train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import MllamaImageParams
from .reference import MllamaReference

CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "mllama_chat_template.jinja"

# Llama 3.2 Vision's special tokens, in id order after the text vocabulary (the real checkpoint has
# 256 of them, most reserved; the tiny one keeps those its template and generation use). <|image|>
# comes last: it is the row just past the text vocabulary (embed_tokens has vocab_size + 8 rows).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
IMAGE_TOKEN = "<|image|>"


def _modules():
    """The torch wrappers (built lazily so importing this module needs no torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from ..attention import NEG, cross_attend
    from ..decoder import StaticCacheDecoder

    class VisionEncoder(nn.Module):
        """tiles [T, 3, H, W], aspect_ratio_id [1], aspect_ratio_mask [T] -> features [T, P, vision_output_dim].

        MllamaVisionModel.forward for one image, calling the checkpoint's own modules. Only the padding
        mask is written differently: transformers builds it as `inv @ invᵀ * finfo.min` (a product that
        turns into 0 * -inf = NaN once fp16 rounds finfo(fp32).min to -inf); here it is a `where` with the
        same values: finfo.min where both the query and the key patch are padding, else 0.
        """

        def __init__(self, vm):
            super().__init__()
            self.vm = vm
            self.tiles = vm.max_num_tiles
            self.patches = vm.num_patches  # per tile, with the class token
            self.layers_out = list(vm.intermediate_layers_indices)

        def forward(self, pixel_values, aspect_ratio_id, aspect_ratio_mask):
            vm, T, P = self.vm, self.tiles, self.patches
            ar = aspect_ratio_id.view(1, 1)
            x = vm.patch_embedding(pixel_values.to(vm.patch_embedding.weight.dtype))  # [T, dim, h, w]
            x = x.flatten(2).transpose(1, 2)  # [T, P-1, dim]
            dim = x.shape[-1]
            x = vm.pre_tile_positional_embedding(x.reshape(1, T, P - 1, dim), ar)
            x = vm.apply_class_embedding(x.reshape(T, P - 1, dim))  # [T, P, dim]
            x = vm.gated_positional_embedding(x.reshape(1, T, P, dim), ar)
            x = vm.layernorm_pre(x)
            pad = (8 - P % 8) % 8
            L = P + pad
            x = F.pad(x, (0, 0, 0, pad))
            # padding = a masked tile, or a patch slot added above (transformers' quirk kept: with no
            # padded slot its `mask[:, :, -0:] = 0` marks every patch as padding)
            real_patch = torch.arange(L) < P if pad else torch.zeros(L, dtype=torch.bool)
            inv = ~(aspect_ratio_mask.view(T, 1).bool() & real_patch.view(1, L))
            inv = inv.reshape(T * L)
            bias = torch.where(inv.view(-1, 1) & inv.view(1, -1), torch.full((), NEG), torch.zeros(()))
            bias = bias.view(1, 1, T * L, T * L)
            x = x.reshape(1, T * L, dim)
            kept = []
            for layer in vm.transformer.layers:
                x = layer(x, attention_mask=bias)
                kept.append(x)
            x = vm.layernorm_post(x)
            x = vm.post_tile_positional_embedding(x.reshape(1, T, L, dim), ar)
            x = x.reshape(1, T * L, dim)
            for layer in vm.global_transformer.layers:
                x = layer(x, attention_mask=bias)
            x = x.reshape(T, L, dim)[:, :P]
            inter = torch.stack([kept[i] for i in self.layers_out], dim=-1).reshape(T, L, -1)[:, :P]
            return torch.cat([x, inter], dim=-1)

    class CrossKV(nn.Module):
        """states [tiles, P, hidden] -> per cross-attention layer key, value [1, kv, tiles, P, head_dim]."""

        def __init__(self, layers):
            super().__init__()
            self.layers = nn.ModuleList(layers)

        def forward(self, cross_states):
            tiles, P = cross_states.shape[0], cross_states.shape[1]
            out = []
            for layer in self.layers:
                ca = layer.cross_attn
                k = ca.k_proj(cross_states).view(1, tiles * P, ca.num_key_value_heads, ca.head_dim).transpose(1, 2)
                v = ca.v_proj(cross_states).view(1, tiles * P, ca.num_key_value_heads, ca.head_dim).transpose(1, 2)
                k = ca.k_norm(k)
                shape = (1, ca.num_key_value_heads, tiles, P, ca.head_dim)
                out += [k.reshape(shape), v.reshape(shape)]
            return tuple(out)

    class Decoder(StaticCacheDecoder):
        """The generic decoder with mllama's cross-attention layers, which read precomputed cross K/V.

        Self-attention layers are transformers' own decoder layers (attention swapped for the static cache);
        the cross-attention layers are written here: queries and q_norm from the checkpoint, keys/values from
        the `cross_key_j / cross_value_j` inputs, masked per text token and tile by `cross_attention_mask
        [B, S, tiles]`. A token that may see no tile attends all of them with bias 0 and its MLP output is
        zeroed (transformers' full_text_row_masked_out_mask); `has_image [B]` = 0 turns every cross-attention
        layer into the identity (transformers skips them for a text-only prompt).
        """

        def __init__(self, spec, lm, lm_head, patches: int):
            super().__init__(spec, lm, lm_head)
            self.patches = patches
            self.cross = set(lm.cross_attention_layers)

        def run_stack(self, x):
            lm, h = self.text_model, x["inputs_embeds"]
            bsz, seq = h.shape[0], h.shape[1]
            position_ids = x["position_ids"]
            cos_sin = lm.rotary_emb(h, position_ids)
            cmask = x["cross_attention_mask"]
            tiles = cmask.shape[2]
            allowed = cmask.bool().unsqueeze(-1).expand(bsz, seq, tiles, self.patches).reshape(bsz, 1, seq, tiles * self.patches)
            row = allowed.any(dim=-1, keepdim=True).to(torch.float32)  # [B, 1, S, 1]
            cross_bias = torch.where(allowed, torch.zeros(()), torch.full((), NEG)) * row
            gate = x["has_image"].to(torch.float32).view(bsz, 1, 1)
            for i, layer in enumerate(lm.layers):
                if i not in self.cross:
                    h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin, cache=None, use_cache=False)
                    h = h[0] if isinstance(h, tuple) else h
                    continue
                ca = layer.cross_attn
                residual = h
                q = ca.q_norm(ca.q_proj(layer.input_layernorm(h)).view(bsz, seq, ca.num_heads, ca.head_dim).transpose(1, 2))
                ck = x[f"cross_key_{i}"].reshape(bsz, ca.num_key_value_heads, -1, ca.head_dim)
                cv = x[f"cross_value_{i}"].reshape(bsz, ca.num_key_value_heads, -1, ca.head_dim)
                o = ca.o_proj(cross_attend(q, ck, cv, cross_bias, ca.scaling))
                h = residual + gate * (layer.cross_attn_attn_gate.tanh() * o)
                residual = h
                m = layer.mlp(layer.post_attention_layernorm(h)) * row[:, 0]
                h = residual + gate * (layer.cross_attn_mlp_gate.tanh() * m)
            return lm.norm(h)

    return VisionEncoder, CrossKV, Decoder


class MllamaAdapter(MllamaReference, FamilyAdapter):
    model_class = "MllamaForConditionalGeneration"

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 1}  # Llama 3.2 Vision is trained and documented with one image per prompt

    # -- checkpoints ---------------------------------------------------------------------------
    def make_synthetic(self, recipe: Recipe, out_dir: Path) -> None:
        import torch

        from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        syn = recipe.synthetic or {}
        tok = train_bpe_tokenizer(SPECIAL_TOKENS + [IMAGE_TOKEN], int(syn.get("tokenizer_vocab_size", 1024)), split=LLAMA3_SPLIT)
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + [IMAGE_TOKEN]}
        text = dict(syn["text_config"])
        # the text vocabulary ends just before <|image|>, as in the real checkpoint (128256)
        text.update(
            vocab_size=ids[IMAGE_TOKEN],
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            pad_token_id=ids["<|finetune_right_pad_id|>"],
        )
        vision = dict(syn["vision_config"])
        config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids[IMAGE_TOKEN])
        seed = int(syn.get("seed", 0))
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config).eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                if name.endswith("gate"):
                    # transformers initialises every tanh gate to 0, which would switch the tile/position
                    # embeddings and every cross-attention layer off; random gates make them count
                    p.copy_(torch.empty(p.shape).uniform_(0.3, 1.2, generator=gen))
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * float(syn.get("init_std", 0.08)))
        model.save_pretrained(out_dir)

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
        )
        tokenizer.chat_template = CHAT_TEMPLATE_FILE.read_text()
        tokenizer.save_pretrained(out_dir)
        tile = int(vision["image_size"])
        MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=int(vision.get("max_num_tiles", 4))).save_pretrained(out_dir)
        GenerationConfig(
            bos_token_id=ids["<|begin_of_text|>"],
            pad_token_id=ids["<|finetune_right_pad_id|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            do_sample=False,
        ).save_pretrained(out_dir)

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _sizes(model) -> dict[str, Any]:
        vc, tc = model.config.vision_config, model.config.text_config
        cross = list(tc.cross_attention_layers)
        return dict(
            tiles=vc.max_num_tiles,
            tile=vc.image_size,
            patches=(vc.image_size // vc.patch_size) ** 2 + 1,
            vision_out=vc.vision_output_dim,
            hidden=tc.hidden_size,
            vocab=tc.vocab_size,
            layers=tc.num_hidden_layers,
            cross=cross,
            self_layers=[i for i in range(tc.num_hidden_layers) if i not in cross],
            kv_heads=tc.num_key_value_heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        )

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        s = self._sizes(model)
        T, P, D, kv = s["tiles"], s["patches"], s["head_dim"], s["kv_heads"]
        ctx = recipe.limits.max_context
        from ..decoder import decoder_spec, embed_spec

        f = "float32"
        tiles = Dim("cross_tiles", 1, T, recipe.limits.max_images * T)
        cache = text_cache(model.config.text_config, recipe.limits, s["self_layers"])
        cross_in, cross_out = [], []
        for j in s["cross"]:
            for kind in ("key", "value"):
                cross_in.append(TensorSpec(f"cross_{kind}_{j}", f, ("batch", kv, "cross_tiles", P, D), "from cross_kv, fixed for the request"))
                cross_out.append(TensorSpec(f"cross_{kind}_{j}", f, (1, kv, "cross_tiles", P, D), "cross-attention layer keys/values"))
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, (T, 3, s["tile"], s["tile"]), "one image's tiles (padding tiles zero)"),
                    TensorSpec("aspect_ratio_id", "int64", (1,), "1-based index of the tile layout; 0 = padding"),
                    TensorSpec("aspect_ratio_mask", "int64", (T,), "1 = real tile"),
                ),
                outputs=(TensorSpec("vision_hidden", f, (T, P, s["vision_out"])),),
                doc="tiled ViT: local transformer (+ intermediate layers) and gated global transformer, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, (T, P, s["vision_out"])),),
                outputs=(TensorSpec("image_states", f, (T, P, s["hidden"])),),
                doc="multi_modal_projector: Linear to the text width",
            ),
            ComponentSpec(
                "cross_kv",
                inputs=(TensorSpec("cross_states", f, ("cross_tiles", P, s["hidden"]), "projected states of all images, tile after tile"),),
                outputs=tuple(cross_out),
                dims={"cross_tiles": tiles},
                doc="k_proj + k_norm and v_proj of every cross-attention layer, once per request",
            ),
            embed_spec(s["hidden"], cache),
            decoder_spec(
                cache, s["hidden"], s["vocab"], positions="1d",
                extra_inputs=(
                    TensorSpec("cross_attention_mask", "int64", ("batch", "seq_len", "cross_tiles"), "1 = token attends tile"),
                    TensorSpec("has_image", "int64", ("batch",), "0 = text-only: cross-attention layers are skipped"),
                ),
                trailing_inputs=tuple(cross_in),
                extra_dims={"cross_tiles": tiles},
                doc="Llama decoder: self-attention over a static KV cache, cross-attention over cross_kv's K/V",
            ),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import decoder_example
        from ..parts import EmbedTokens, ModuleCall

        VisionEncoder, CrossKV, Decoder = _modules()
        s = self._sizes(model)
        T, P = s["tiles"], s["patches"]
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        lm = model.model.language_model
        # examples: a 2-tile image (aspect id 2), two images' tile slots (one if the recipe allows one),
        # a 7-token step after 5 cached tokens whose first two tokens see no image, the others all but one tile
        ar_mask = torch.zeros(T, dtype=torch.int64)
        ar_mask[: min(2, T)] = 1
        tiles, seq = min(2, recipe.limits.max_images) * T, 7
        # batch rows (2 when the build batches: a size of 1 would be specialized) with their own cache lengths,
        # positions and images (decoder_example): row 0 has an image whose tiles its tokens from the third on
        # see, all but one; row 1 is text-only (has_image 0, no tile)
        B = min(2, specs["decoder"].dims["batch"].max)
        cmask = torch.zeros(B, seq, tiles, dtype=torch.int64)
        cmask[0, 2:, : tiles - 1] = 1
        dec = decoder_example(specs["decoder"], seq=seq, overrides={
            "cross_attention_mask": cmask,
            "has_image": (torch.arange(B) == 0).to(torch.int64),
            **{f"cross_{kind}_{j}": torch.randn(B, s["kv_heads"], tiles, P, s["head_dim"], generator=g)
               for j in s["cross"] for kind in ("key", "value")},
        })
        vm = model.model.vision_model
        return [
            ExportComponent(
                specs["vision_encoder"],
                VisionEncoder(vm).eval(),
                {
                    "pixel_values": torch.randn(T, 3, s["tile"], s["tile"], generator=g),
                    "aspect_ratio_id": torch.tensor([2]),
                    "aspect_ratio_mask": ar_mask,
                },
            ),
            ExportComponent(specs["projector"], ModuleCall(model.model.multi_modal_projector).eval(),
                            {"vision_hidden": torch.randn(T, P, s["vision_out"], generator=g)}),
            ExportComponent(specs["cross_kv"], CrossKV([lm.layers[j] for j in s["cross"]]).eval(),
                            {"cross_states": torch.randn(tiles, P, s["hidden"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, s["vocab"], (B, seq), generator=g)}),
            ExportComponent(specs["decoder"], Decoder(specs["decoder"], lm, model.lm_head, P).eval(), dec),
        ]

    # -- runtime configuration -----------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> MllamaImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return MllamaImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        s = self._sizes(model)
        pre = self._preprocessor(model_dir)
        vc = model.config.vision_config
        if pre.max_image_tiles != s["tiles"] or pre.tile_size != s["tile"]:
            raise UserError(f"{model_dir}: preprocessor tiles ({pre.max_image_tiles} x {pre.tile_size}x{pre.tile_size}) "
                            f"do not match the vision model ({s['tiles']} x {s['tile']}x{s['tile']})")
        return {
            "image": pre.to_dict(),
            "image_token": IMAGE_TOKEN,
            "vision": {
                "max_tiles": s["tiles"],
                "patches_per_tile": s["patches"],
                "supported_aspect_ratios": [list(r) for r in vc.supported_aspect_ratios],
            },
            "text": {
                "hidden_size": s["hidden"],
                "num_layers": s["layers"],
                "cross_attention_layers": s["cross"],
                "num_kv_heads": s["kv_heads"],
                "head_dim": s["head_dim"],
                "vocab_size": s["vocab"],
            },
            "tokens": {"image_token_id": int(model.config.image_token_id)},
        }


