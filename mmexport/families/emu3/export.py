"""Emu3 (Method A, image understanding), export side.

Components:
  vision_encoder  one image [1, 3, H, W] -> the VQ-VAE's latents [h*w, embed_dim] (encoder over the image repeated
                  temporal_downsample_factor times, as transformers does for a still image, then quant_conv) and
                  codes [h*w] int64: the nearest codebook entry (||z||² + ||e||² - 2 z·e, ArgMin in the graph)
  embed_tokens    token ids -> embeddings (the image's codes become ordinary vocabulary tokens on the host)
  decoder         the generic decoder over Emu3's Llama-like text stack, 1D positions
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
from .image import Emu3ImageParams
from .reference import Emu3Reference

# Emu3-Chat-hf's special tokens: pad, end of line (after each row of image codes), end of frame, BOS, EOS, the
# image wrapper tokens and the placeholder
SPECIAL = {
    "pad_token": "<|endoftext|>", "eol_token": "<|extra_200|>", "eof_token": "<|extra_201|>", "bos_token": "<|extra_203|>",
    "eos_token": "<|extra_204|>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>", "image_token": "<image>",
}
VISUAL_TOKEN = "<|visual token{:06d}|>"
DOWNSAMPLE_RATIO = 8  # Emu3Processor.downsample_ratio (fixed in transformers)

# Emu3-Chat's conversation format ("You are a helpful assistant. USER: <image>question ASSISTANT:", the prompt of
# BAAI's Emu3 chat example); used when a checkpoint ships no chat template. Emu3Processor adds the BOS itself.
CHAT_TEMPLATE = (
    "{%- set system = namespace(text='You are a helpful assistant.') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}{%- set system.text = message['content'] if message['content'] is string "
    "else (message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}{%- endfor -%}"
    "{{- system.text -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- ' ' + message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)


class Emu3Adapter(Emu3Reference, FamilyAdapter):
    model_class = "Emu3ForConditionalGeneration"
    default_chat_template = CHAT_TEMPLATE

    @classmethod
    def synthetic_parts(cls, syn: dict[str, Any]):
        """(model, tokenizer, image processor, generation config): a seeded Emu3ForConditionalGeneration (VQ-VAE +
        Llama-like text stack) and the in-repo BPE tokenizer with Emu3's special tokens and one
        <|visual tokenNNNNNN|> per codebook entry; the config's vocabulary_map is the tokenizer's vocabulary."""
        import torch
        from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, GenerationConfig, PreTrainedTokenizerFast

        vq = dict(syn["vq_config"])
        codebook = int(vq["codebook_size"])
        specials = list(dict.fromkeys(SPECIAL.values())) + [VISUAL_TOKEN.format(i) for i in range(codebook)]
        tok = train_bpe_tokenizer(specials, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {k: tok.token_to_id(v) for k, v in SPECIAL.items()}
        text = dict(syn["text_config"])
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        text.update(vocab_size=vocab, bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"])
        config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=tok.get_vocab(), tie_word_embeddings=False)
        torch.manual_seed(int(syn.get("seed", 0)))
        model = Emu3ForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not name.startswith("model.vqmodel"):
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)  # the VQ-VAE keeps transformers' init
            # running BatchNorm statistics of a trained model rather than the identity
            for m in model.model.vqmodel.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=gen))
        generation = GenerationConfig(bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"], do_sample=False)
        model.generation_config = generation
        extra = {k: SPECIAL[k] for k in ("image_token", "boi_token", "eoi_token", "image_wrapper_token", "eof_token")}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos_token"], eos_token=SPECIAL["eos_token"],
                                            pad_token=SPECIAL["pad_token"], extra_special_tokens=extra)
        return model, tokenizer, Emu3ImageProcessor(**dict(syn.get("preprocessor", {}))), generation

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> Emu3ImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return Emu3ImageParams.from_preprocessor_config(json.loads(p.read_text()))

    @staticmethod
    def _vq_factor(model) -> int:
        return 2 ** (len(model.config.vq_config.channel_multiplier) - 1)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        pre = self._preprocessor(model_dir)
        f = self._vq_factor(model)
        if f != DOWNSAMPLE_RATIO or pre.spatial_factor % f:
            raise UserError(f"{model_dir}: the VQ-VAE downsamples by {f}; Emu3Processor assumes {DOWNSAMPLE_RATIO} "
                            f"and the image processor resizes to multiples of {pre.spatial_factor}")
        if model.config.vq_config.temporal_downsample_factor < 1:
            raise UserError(f"{model_dir}: vq_config.temporal_downsample_factor must be >= 1")
        m = pre.spatial_factor
        # smart_resize keeps h*w <= max_pixels; a side could reach max_pixels / factor for a 200:1 strip, but the
        # TensorRT profile's maximum is both sides at once: sides up to 4 * sqrt(max_pixels) (every aspect ratio
        # up to 16:1 fits); the runtime refuses a longer strip in one line (Emu3Runtime.vision_limits)
        side_max = max(m, min((pre.max_pixels // m) // m * m, int(4 * pre.max_pixels**0.5) // m * m))
        side = Dim("height", m, min(side_max, max(m, round((pre.min_pixels + pre.max_pixels) ** 0.5 / 2 / m) * m)), side_max, multiple=m)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        vq = model.config.vq_config
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(TensorSpec("pixel_values", "float32", (1, 3, "height", "width"), "one image, resized by Emu3's smart_resize"),),
                outputs=(TensorSpec("latents", "float32", ("num_codes", vq.embed_dim), "quant_conv output per latent position, raster order"),
                         TensorSpec("codes", "int64", ("num_codes",), "nearest codebook entry per latent position")),
                dims={"height": side, "width": Dim("width", side.min, side.opt, side.max, multiple=m)},
                doc="Emu3 VQ-VAE encoder + quant_conv + nearest-code ArgMin, one image per call",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d", doc="Emu3 (Llama-like) decoder over a static KV cache"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        hd, wd = specs["vision_encoder"].dims["height"], specs["vision_encoder"].dims["width"]

        def pick(d: Dim, near: int) -> int:
            sizes = [v for v in range(d.min, d.max + 1, d.multiple) if v != d.opt and v // d.multiple > 1] or [d.max]
            return min(sizes, key=lambda v: abs(v - near))

        h = pick(hd, 5 * hd.multiple)
        w = pick(wd, 7 * wd.multiple)
        text = model.model.text_model
        vocab = model.config.text_config.vocab_size
        return [
            ExportComponent(specs["vision_encoder"], VQEncoder(model.model.vqmodel).eval(), {"pixel_values": torch.randn(1, 3, h, w, generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(text.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], text, model.lm_head).eval(), decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        vmap = cfg.vocabulary_map
        codebook = cfg.vq_config.codebook_size
        try:
            visual = [int(vmap[VISUAL_TOKEN.format(i)]) for i in range(codebook)]
        except KeyError as e:
            raise UserError(f"{model_dir}: vocabulary_map has no {e.args[0]} (one visual token per codebook entry)") from None
        contiguous = visual == list(range(visual[0], visual[0] + codebook))
        tokens = {k: SPECIAL[k] for k in ("image_token", "boi_token", "eoi_token", "image_wrapper_token", "eof_token")}
        tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").is_file() else {}
        bos = tok_cfg.get("bos_token", SPECIAL["bos_token"])
        tokens["bos_token"] = bos["content"] if isinstance(bos, dict) else bos
        tokens["image_token_id"] = int(vmap[SPECIAL["image_token"]])
        tokens["eol_token_id"] = int(vmap[SPECIAL["eol_token"]])
        tc = cfg.text_config
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "vision": {"downsample_ratio": DOWNSAMPLE_RATIO, "spatial_factor": self._vq_factor(model), "codebook_size": codebook,
                       "visual_token_ids": {"start": visual[0], "count": codebook} if contiguous else visual},
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "vocab_size": tc.vocab_size},
            "tokens": tokens,
        }


def VQEncoder(vqmodel):
    """Emu3VQVAE.encode for one still image, up to the codes: pixel_values [1, 3, H, W] -> latents [h*w, D], codes [h*w]."""
    import torch
    from torch import nn

    class _VQEncoder(nn.Module):
        def __init__(self, vq):
            super().__init__()
            self.encoder, self.quant_conv = vq.encoder, vq.quant_conv
            self.codebook = vq.quantize.embedding.weight
            self.temporal = int(vq.config.temporal_downsample_factor)

        def forward(self, pixel_values):
            x = pixel_values.unsqueeze(1).repeat(1, self.temporal, 1, 1, 1)  # a still image is `temporal` equal frames
            h = self.encoder(x)  # [1, T', C, h, w]
            h = self.quant_conv(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)  # [1, T', D, h, w]
            z = h[:, 0].permute(0, 2, 3, 1).reshape(-1, h.shape[2])  # T' = 1 for an image; raster order
            e = self.codebook
            dist = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.matmul(z, e.t())
            return z, torch.argmin(dist, dim=1)

    return _VQEncoder(vqmodel)
