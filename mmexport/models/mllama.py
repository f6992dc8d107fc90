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
  decoder         self-attention layers over a static KV cache (as Qwen2-VL's) and cross-attention layers that
                  read the cross K/V inputs, masked per text token and tile by `cross_attention_mask [B, S, tiles]`.
                  `has_image [B]` = 0 turns every cross-attention layer into the identity, which is what
                  transformers does for a text-only prompt (it skips those layers).
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
from .synthetic import LLAMA3_SPLIT, train_bpe_tokenizer

CHAT_TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "data" / "mllama_chat_template.jinja"

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


def _torch():
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return torch


# ---------------------------------------------------------------------------------------------
# torch wrappers (built lazily so importing this module needs no torch)
# ---------------------------------------------------------------------------------------------
def _wrappers():
    torch = _torch()
    from torch import nn
    from torch.nn import functional as F
    from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

    from .torch_ops import NEG, EmbedTokens, attend_with_cache, cache_biases, cross_attend

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

    class Projector(nn.Module):
        """features [T, P, vision_output_dim] -> states [T, P, hidden] (multi_modal_projector)."""

        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, vision_hidden):
            return self.proj(vision_hidden)

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

    class Decoder(nn.Module):
        """Llama text model with interleaved cross-attention layers over precomputed cross K/V.

        Inputs: inputs_embeds [B, S, H], position_ids [B, S], cache_mask [B, cache_len],
        cross_attention_mask [B, S, tiles] (1 = this token attends that tile), has_image [B], then
        cache_key_i/cache_value_i for every self-attention layer i and cross_key_j/cross_value_j for every
        cross-attention layer j. Outputs: last-position logits and the new tokens' self-attention K/V.
        """

        def __init__(self, lm, lm_head, patches: int):
            super().__init__()
            self.lm = lm
            self.lm_head = lm_head
            self.patches = patches
            cross = set(lm.cross_attention_layers)
            self.kinds = ["cross" if i in cross else "self" for i in range(len(lm.layers))]

        def forward(self, inputs_embeds, position_ids, cache_mask, cross_attention_mask, has_image, *kv):
            h = inputs_embeds
            bsz, seq = h.shape[0], h.shape[1]
            cos, sin = self.lm.rotary_emb(h, position_ids)
            cache_bias, new_bias = cache_biases(cache_mask, seq)
            # cross mask per tile -> per vision token; a token that may see no tile attends all of them
            # with bias 0 and its MLP output is zeroed (transformers' full_text_row_masked_out_mask)
            tiles = cross_attention_mask.shape[2]
            allowed = cross_attention_mask.bool().unsqueeze(-1).expand(bsz, seq, tiles, self.patches)
            allowed = allowed.reshape(bsz, 1, seq, tiles * self.patches)
            row = allowed.any(dim=-1, keepdim=True).to(torch.float32)  # [B, 1, S, 1]
            cross_bias = torch.where(allowed, torch.zeros(()), torch.full((), NEG)) * row
            gate = has_image.to(torch.float32).view(bsz, 1, 1)
            n_self = self.kinds.count("self")
            caches, crosses = kv[: 2 * n_self], kv[2 * n_self :]
            si = ci = 0
            new_kv = []
            for kind, layer in zip(self.kinds, self.lm.layers):
                residual = h
                x = layer.input_layernorm(h)
                if kind == "self":
                    att = layer.self_attn
                    q = att.q_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                    k = att.k_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                    v = att.v_proj(x).view(bsz, seq, -1, att.head_dim).transpose(1, 2)
                    q, k = apply_rotary_pos_emb(q, k, cos, sin)
                    new_kv += [k, v]
                    o = attend_with_cache(q, k, v, caches[2 * si], caches[2 * si + 1], cache_bias, new_bias, att.scaling, att.num_key_value_groups)
                    si += 1
                    h = residual + att.o_proj(o)
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
                else:
                    ca = layer.cross_attn
                    q = ca.q_norm(ca.q_proj(x).view(bsz, seq, ca.num_heads, ca.head_dim).transpose(1, 2))
                    ck = crosses[2 * ci].reshape(bsz, ca.num_key_value_heads, -1, ca.head_dim)
                    cv = crosses[2 * ci + 1].reshape(bsz, ca.num_key_value_heads, -1, ca.head_dim)
                    ci += 1
                    o = ca.o_proj(cross_attend(q, ck, cv, cross_bias, ca.scaling, ca.num_key_value_groups))
                    h = residual + gate * (layer.cross_attn_attn_gate.tanh() * o)
                    residual = h
                    m = layer.mlp(layer.post_attention_layernorm(h)) * row[:, 0]
                    h = residual + gate * (layer.cross_attn_mlp_gate.tanh() * m)
            h = self.lm.norm(h[:, -1:, :])
            return (self.lm_head(h), *new_kv)

    return VisionEncoder, Projector, CrossKV, EmbedTokens, Decoder


@register("mllama")
class MllamaAdapter(FamilyAdapter):
    model_types = ("mllama",)

    # -- checkpoints ---------------------------------------------------------------------------
    def make_synthetic(self, recipe: Recipe, out_dir: Path) -> None:
        torch = _torch()
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

    def load(self, model_dir: Path):
        self.check_checkpoint(model_dir)
        torch = _torch()
        from transformers import MllamaForConditionalGeneration

        model = MllamaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
        return model.eval()

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
            head_dim=tc.hidden_size // tc.num_attention_heads,
        )

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        s = self._sizes(model)
        T, P, D, kv = s["tiles"], s["patches"], s["head_dim"], s["kv_heads"]
        ctx = recipe.limits.max_context
        f = "float32"
        seq = Dim("seq_len", 1, min(64, ctx), ctx)
        tiles = Dim("cross_tiles", 1, T, recipe.limits.max_images * T)
        cache = StaticKVCache(list(s["self_layers"]), kv, D, ctx, max_batch=recipe.limits.max_batch)
        batch = cache.batch_dim()
        mask_in, cache_in = cache.inputs()
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
                    TensorSpec("position_ids", "int64", ("batch", "seq_len")),
                    *mask_in,
                    TensorSpec("cross_attention_mask", "int64", ("batch", "seq_len", "cross_tiles"), "1 = token attends tile"),
                    TensorSpec("has_image", "int64", ("batch",), "0 = text-only: cross-attention layers are skipped"),
                    *cache_in,
                    *cross_in,
                ),
                outputs=(TensorSpec("logits", f, ("batch", 1, s["vocab"]), "last position only"), *cache.outputs()),
                dims={"batch": batch, "seq_len": seq, "cross_tiles": tiles, **cache.dims()},
                profiles=cache.profiles(),
                doc="Llama decoder: self-attention over a static KV cache, cross-attention over cross_kv's K/V",
            ),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        torch = _torch()
        VisionEncoder, Projector, CrossKV, EmbedTokens, Decoder = _wrappers()
        s = self._sizes(model)
        T, P, D, kv = s["tiles"], s["patches"], s["head_dim"], s["kv_heads"]
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        lm = model.model.language_model
        # examples: a 2-tile image (aspect id 2), two images' tile slots (one if the recipe allows one),
        # a 7-token step after 5 cached tokens
        ar_mask = torch.zeros(T, dtype=torch.int64)
        ar_mask[: min(2, T)] = 1
        tiles, seq, ctx = min(2, recipe.limits.max_images) * T, 7, recipe.limits.max_context
        # batch rows (2 when the build batches) with their own cache lengths, positions and images:
        # row 0 has 5 cached tokens and an image, row 1 has 4 and is text-only (has_image 0, no tile)
        B = example_batch(specs["decoder"].dims["batch"])
        pasts = [5 - b for b in range(B)]
        cmask = torch.zeros(B, seq, tiles, dtype=torch.int64)
        cmask[0, 2:, : tiles - 1] = 1  # the first two tokens see no image, the others all but one tile
        mask = torch.zeros(B, ctx, dtype=torch.int64)
        for b, p in enumerate(pasts):
            mask[b, :p] = 1
        dec: dict[str, Any] = {
            "inputs_embeds": torch.randn(B, seq, s["hidden"], generator=g),
            "position_ids": torch.stack([torch.arange(p, p + seq) for p in pasts]),
            "cache_mask": mask,
            "cross_attention_mask": cmask,
            "has_image": (torch.arange(B) == 0).to(torch.int64),
        }
        for i in s["self_layers"]:
            for kind in ("key", "value"):
                dec[f"cache_{kind}_{i}"] = torch.randn(B, kv, ctx, D, generator=g)
        for j in s["cross"]:
            for kind in ("key", "value"):
                dec[f"cross_{kind}_{j}"] = torch.randn(B, kv, tiles, P, D, generator=g)
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
            ExportComponent(specs["projector"], Projector(model.model.multi_modal_projector).eval(),
                            {"vision_hidden": torch.randn(T, P, s["vision_out"], generator=g)}),
            ExportComponent(specs["cross_kv"], CrossKV([lm.layers[j] for j in s["cross"]]).eval(),
                            {"cross_states": torch.randn(tiles, P, s["hidden"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, s["vocab"], (B, seq), generator=g)}),
            ExportComponent(specs["decoder"], Decoder(lm, model.lm_head, P).eval(), dec),
        ]

    # -- runtime configuration -----------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path):
        from ..runtime.mllama_image import MllamaImageParams

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


# ---------------------------------------------------------------------------------------------
# PyTorch references for verify (transformers' own processor and model)
# ---------------------------------------------------------------------------------------------
def _reference_inputs(model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """MllamaProcessor's output for the chat-rendered prompt (tokenizer + PIL image processor)."""
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    proc = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(model_dir, local_files_only=True), tokenizer=tok)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template already starts with <|begin_of_text|>; the processor must not add another
    return dict(proc(images=[list(images)] if images else None, text=text, return_tensors="pt", add_special_tokens=False))


def _reference_outputs(model, inputs: dict[str, Any]) -> dict[str, Any]:
    torch = _torch()
    ids = inputs["input_ids"]
    ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
    lm = model.model.language_model
    cross = list(lm.cross_attention_layers)
    with torch.no_grad():
        ref["embed_tokens"] = lm.embed_tokens(ids).numpy()
        out = model(**inputs, use_cache=True)
        ref["logits"] = out.logits[0, -1].numpy()
        if "pixel_values" in inputs:
            pv, ar_ids, ar_mask = inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
            n = pv.shape[1]
            ref["pixel_values"] = [pv[0, i].numpy() for i in range(n)]
            ref["aspect_ratio_ids"] = ar_ids[0].numpy()
            ref["aspect_ratio_mask"] = ar_mask[0].numpy()
            feats = model.model.vision_model(pixel_values=pv, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask).last_hidden_state
            ref["vision_encoder"] = [feats[0, i].numpy() for i in range(n)]
            states = model.model.multi_modal_projector(feats)  # [1, n, T, P, hidden]
            ref["projector"] = [states[0, i].numpy() for i in range(n)]
            ref["cross_states"] = states[0].reshape(-1, states.shape[-2], states.shape[-1]).numpy()
            ref["cross_attention_mask"] = inputs["cross_attention_mask"][0].numpy()  # [S, n, T]
            # the cross K/V transformers itself cached in each cross-attention layer during that forward
            P = states.shape[-2]
            for j in cross:
                layer = out.past_key_values.layers[j]
                kvh, _, d = layer.keys.shape[1:]
                ref[f"cross_key_{j}"] = layer.keys.reshape(1, kvh, -1, P, d).numpy()
                ref[f"cross_value_{j}"] = layer.values.reshape(1, kvh, -1, P, d).numpy()
    return ref


def _reference_generate(model, inputs: dict[str, Any], n: int) -> list[int]:
    torch = _torch()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _verify_components(pipe, prep, ref: dict[str, Any], case: str, tol_for) -> list:
    """Each exported component on the reference's own inputs, so errors do not compound."""
    import numpy as np

    from ..runtime.methods import CrossState
    from ..runtime.pipeline import KVCache
    from ..verify import Check, compare, component_tol

    out = []
    for i, img in enumerate(prep.images):
        tag = f"{case}[{i}]"
        out.append(compare(tag, "preprocess", img.pixel_values, ref["pixel_values"][i], 1e-5, 0.999999))
        same = img.aspect_ratio_id == int(ref["aspect_ratio_ids"][i]) and np.array_equal(img.aspect_ratio_mask, ref["aspect_ratio_mask"][i])
        out.append(Check(tag, "tiles", same, f"aspect ratio id {img.aspect_ratio_id}, {img.num_tiles} tile(s): "
                         + ("identical to transformers" if same else f"transformers: id {int(ref['aspect_ratio_ids'][i])}")))
        feats = pipe.runners["vision_encoder"].infer(pipe.family.vision_feeds(img))["vision_hidden"]
        out.append(compare(tag, "vision_encoder", feats, ref["vision_encoder"][i], *component_tol(tol_for("vision_encoder"))))
        states = pipe.runners["projector"].infer({"vision_hidden": ref["vision_encoder"][i].astype(np.float32)})["image_states"]
        out.append(compare(tag, "projector", states, ref["projector"][i], *component_tol(tol_for("projector"))))
    out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
    if prep.images:
        kv = pipe.runners["cross_kv"].infer({"cross_states": ref["cross_states"].astype(np.float32)})
        for name in sorted(kv):
            out.append(compare(case, f"cross_kv {name}", kv[name], ref[name], *component_tol(tol_for("cross_kv"))))
        ours_mask = pipe.family._mask(prep, CrossState({}, ref["cross_states"].shape[0], True))
        same = np.array_equal(ours_mask, ref["cross_attention_mask"].reshape(len(prep.input_ids), -1))
        out.append(Check(case, "cross-attention mask", same, "identical to transformers" if same else "differs from transformers"))
        state = CrossState({k: ref[k].astype(np.float32) for k in kv}, ref["cross_states"].shape[0], True)
    else:
        state = pipe.encode_images([])
    logits = pipe.decoder_step(ref["embed_tokens"].astype(np.float32), pipe.family.prefill_feeds(prep, state), KVCache(pipe.specs["decoder"]))
    t = tol_for("decoder")
    out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
    return out


MllamaAdapter.reference_inputs = staticmethod(_reference_inputs)
MllamaAdapter.reference_outputs = staticmethod(_reference_outputs)
MllamaAdapter.reference_generate = staticmethod(_reference_generate)
MllamaAdapter.verify_components = staticmethod(_verify_components)
