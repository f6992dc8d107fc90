"""Molmo2 (Method A: pooled image features added to the image-patch tokens' embeddings), export side.

Components, each exported on its own:
  vision_encoder  one image's crops [crops, patches, patch_dim] (the low-res global view and the overlapping
                  high-res crops, each a fixed crop_size square) -> the ViT hidden states of the layers the
                  adapter reads (`vision_feature_layer`), concatenated: [crops, patches, width * layers].
                  Patch embedding (a Linear), the learned position table, the checkpoint's own encoder layers;
                  every crop attends within itself (no mask).
  projector       Molmo2Adapter: the pooling windows (indices from the host, -1 = padding) gathered from the
                  flat patch features, their masked mean as query of the checkpoint's own cross-attention
                  (`image_pooling_2d`, padded keys masked with a finite bias), then the SwiGLU projector.
                  Every window has a real patch, so no token is dropped (transformers' boolean selection of
                  valid tokens is the identity; the host checks it), and the graph has no NonZero.
  embed_tokens    the text model's embedding (base + additional vocabulary rows).
  decoder         the generic decoder (1D positions) with `image_block_ids`: every image token of the prompt
                  sees every other one (transformers' `mm_token_type_ids` block), causal elsewhere; the text
                  stack's scaled / unscaled rotary per layer, q/k norms and norm-after run unchanged.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import Molmo2ImageParams
from .reference import Molmo2Reference, processor_options

# eos / pad first: they are ordinary (LM-head) rows; the image tokens after them become the additional
# vocabulary rows (embedding only), as in the released checkpoints
TEXT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_SPECIAL = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<frame_start>",
                 "<frame_end>", "<im_low>", "<|image|>", "<|video|>"]
# Molmo2Processor's image_token_ids: the tokens transformers marks with mm_token_type_ids = 1
BLOCK_TOKENS = ["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>", "<im_low>"]


def chat_template() -> str:
    """allenai/Molmo2-4B's chat_template.jinja, verbatim."""
    return resources.files("mmexport.data").joinpath("molmo2_chat_template.jinja").read_text()


def feature_layers(num_layers: int, wanted) -> list[int]:
    """Indices into [embeddings, layer 0 out, layer 1 out, ...] of the adapter's `vision_feature_layer`s, as
    `get_image_features` reads `hidden_states` (l + 1 for l >= 0, l from the end otherwise)."""
    return [(l + 1) if l >= 0 else num_layers + 1 + l for l in wanted]


def vision_encoder_module(model):
    """pixel_values [crops, P, patch_dim] -> image_features [crops, P, width * len(vision_feature_layer)]."""
    import torch
    from torch import nn

    vt = model.model.vision_tower
    taps = feature_layers(len(vt.layers), model.config.adapter_config.vision_feature_layer)

    class VisionEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embedding = vt.patch_embedding
            self.positional_embedding = vt.positional_embedding
            self.layers = nn.ModuleList(list(vt.layers)[: max(taps)])  # the layers after the deepest tap are unused

        def forward(self, pixel_values):
            x = self.patch_embedding(pixel_values) + self.positional_embedding[None]
            hs = [x]
            for layer in self.layers:
                x = layer(x, None)
                hs.append(x)
            return torch.cat([hs[i] for i in taps], dim=-1)

    return VisionEncoder()


def projector_module(model):
    """image_features [crops, P, D], pooled_patches_idx [T, k] -> image_embeds [T, hidden] (Molmo2Adapter)."""
    import torch
    from torch import nn

    adapter = model.model.multi_modal_projector

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = adapter.image_pooling_2d
            self.proj = adapter.image_projector

        def forward(self, image_features, pooled_patches_idx):
            flat = image_features.reshape(-1, image_features.shape[-1])
            valid = pooled_patches_idx >= 0
            x = flat[pooled_patches_idx.clamp(min=0)] * valid.to(flat.dtype)[..., None]  # [T, k, D]
            n = valid.to(flat.dtype).sum(-1).clamp(min=1)
            query = x.sum(-2, keepdim=True) / n[:, None, None]
            # transformers adds finfo.min at padded keys; a finite -1e4 gives the same softmax (every window has
            # a real patch) and stays representable in fp16
            bias = torch.where(valid, 0.0, -1e4).to(flat.dtype)[:, None, None, :]
            pooled, _ = self.pool(query, x, attention_mask=bias)
            return self.proj(pooled.squeeze(1))

    return Projector()


class Molmo2Adapter(Molmo2Reference, FamilyAdapter):
    model_class = "Molmo2ForConditionalGeneration"

    # -- checkpoints ---------------------------------------------------------------------------
    def synthetic_parts(self, syn: dict[str, Any]):
        import torch
        from transformers import GenerationConfig, Molmo2Config, Molmo2ForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        tok = train_bpe_tokenizer(TEXT_SPECIAL + IMAGE_SPECIAL, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in TEXT_SPECIAL + IMAGE_SPECIAL}
        vocab = ids[IMAGE_SPECIAL[0]]  # LM-head rows: the learned vocabulary and the text special tokens
        extra = tok.get_vocab_size() - vocab
        text = dict(syn["text_config"])
        text.update(vocab_size=vocab, additional_vocab_size=-(-extra // 8) * 8)
        pre = dict(syn.get("preprocessor", {}))
        config = Molmo2Config(
            vision_config=dict(syn["vision_config"]), adapter_config=dict(syn["adapter_config"]), text_config=text,
            image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
            image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
            frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
            tie_word_embeddings=False,
        )
        torch.manual_seed(int(syn.get("seed", 0)))
        model = Molmo2ForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        with torch.no_grad():  # a wide init so greedy parity does not hinge on near-ties of an untrained model
            gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
            for _, p in model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        generation = GenerationConfig(bos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = chat_template()
        processor = Molmo2ImageProcessor(**pre)
        return model, tokenizer, processor, generation

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 2}

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> Molmo2ImageParams:
        p = Path(model_dir) / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return Molmo2ImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def _sizes(self, model, model_dir: Path) -> dict[str, Any]:
        vc, ac = model.config.vision_config, model.config.adapter_config
        pre = self._preprocessor(model_dir)
        patches = vc.num_position_embeddings
        if (pre.crop_size // vc.patch_size) ** 2 != patches or pre.patch_size != vc.patch_size:
            raise UserError(f"{model_dir}: preprocessor crops of {pre.crop_size} px / patch {pre.patch_size} do not give the "
                            f"vision tower's {patches} positions of patch {vc.patch_size}")
        ph, pw = pre.pooling_size
        per_crop = -(-pre.crop_patches // ph) * -(-pre.crop_patches // pw)
        return dict(pre=pre, patches=patches, patch_dim=vc.patch_size**2 * vc.num_channels,
                    width=vc.hidden_size * len(ac.vision_feature_layer), pool=ph * pw,
                    max_crops=pre.max_crops + 1, max_tokens=per_crop * (pre.max_crops + 1), min_tokens=per_crop)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        s = self._sizes(model, model_dir)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        f = "float32"
        crops = Dim("num_crops", 1, min(2, s["max_crops"]), s["max_crops"])
        tokens = Dim("num_tokens", 1, min(s["max_tokens"], 2 * s["min_tokens"]), s["max_tokens"])
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(TensorSpec("pixel_values", f, ("num_crops", s["patches"], s["patch_dim"]), "one image's crops, global view first"),),
                outputs=(TensorSpec("image_features", f, ("num_crops", s["patches"], s["width"]), "the vision_feature_layer states, concatenated"),),
                dims={"num_crops": crops},
                doc="patch embedding + learned positions + ViT layers, one image's crops per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("image_features", f, ("num_crops", s["patches"], s["width"])),
                        TensorSpec("pooled_patches_idx", "int64", ("num_tokens", s["pool"]), "flat patch index per pooling slot, -1 = padding")),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", tc.hidden_size)),),
                dims={"num_crops": crops, "num_tokens": tokens},
                doc="Molmo2Adapter: masked-mean query, attention pooling over each window, SwiGLU projector",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         extra_inputs=[TensorSpec("image_block_ids", "int64", ("batch", "seq_len"),
                                                  "1 = an image token (they all see each other), 0 = text")],
                         doc="Molmo2 text stack over a static KV cache; image tokens attend bidirectionally among themselves"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        s = self._sizes(model, model_dir)
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        crops = min(3, s["max_crops"])
        tokens = min(s["max_tokens"], 2 * s["min_tokens"] + 3)
        idx = torch.randint(-1, crops * s["patches"], (tokens, s["pool"]), generator=g)
        idx[:, 0] = idx[:, 0].clamp(min=0)  # every window has a real patch
        lm = model.model.language_model
        dec = specs["decoder"]
        ex = decoder_example(dec)
        ex["image_block_ids"] = (torch.arange(ex["inputs_embeds"].shape[1]) % 3 == 0).long().expand_as(ex["image_block_ids"]).contiguous()
        return [
            ExportComponent(specs["vision_encoder"], vision_encoder_module(model).eval(),
                            {"pixel_values": torch.randn(crops, s["patches"], s["patch_dim"], generator=g)}),
            ExportComponent(specs["projector"], projector_module(model).eval(),
                            {"image_features": torch.randn(crops, s["patches"], s["width"], generator=g), "pooled_patches_idx": idx}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, lm.embed_tokens.num_embeddings, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(dec, StaticCacheDecoder(dec, lm, model.lm_head).eval(), ex),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        cfg = model.config
        block = [int(tok.convert_tokens_to_ids(t)) for t in BLOCK_TOKENS]
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "text": {"hidden_size": cfg.text_config.hidden_size, "vocab_size": cfg.text_config.vocab_size},
            "tokens": {
                "image_patch_id": int(cfg.image_patch_id),
                "block_token_ids": block,
                "bos_token": tok.bos_token or tok.eos_token,
                **processor_options(model_dir),
            },
        }
