"""InternVL (-hf format; Method A: tile embeddings over the `<IMG_CONTEXT>` tokens of an unmodified decoder),
export side.

Components, each exported on its own:
  vision_encoder  one image's tiles [tiles, 3, S, S] -> [tiles, 1 + P, dim]: InternViT as the checkpoint has it
                  (patch conv, class token, absolute position embeddings at the trained size, the encoder layers
                  with their layer scale (lambda_1/2), LayerNorm or RMSNorm and optional q/k-norm, the final norm
                  unless mean pooling). Full attention inside each tile; the tile count is the dynamic axis.
  projector       drop the class token, pixel shuffle (families.parts.pixel_shuffle_tokens: 2x2 -> 4x the
                  width), the MLP projector (LayerNorm, Linear, GELU, Linear) -> [tiles, image_seq_length, hidden].
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder over the checkpoint's language model (Qwen2 for InternVL3), 1D positions.
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
from .image import InternVLImageParams

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
EXTRA_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}

# The chat template transformers' InternVL conversion script gives the -hf checkpoints (OpenGVLab/InternVL3-*-hf)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def vision_modules():
    from torch import nn

    from ..parts import pixel_shuffle_tokens

    class VisionEncoder(nn.Module):
        """pixel_values [tiles, 3, S, S] -> vision_hidden [tiles, 1 + P, dim] (InternVLVisionModel's last hidden state)."""

        def __init__(self, vt):
            super().__init__()
            self.embeddings, self.layers, self.norm = vt.embeddings, vt.encoder.layer, vt.layernorm

        def forward(self, pixel_values):
            x = self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype))
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

    class Projector(nn.Module):
        """vision_hidden [tiles, 1 + P, dim] -> image_embeds [tiles, P / scale^2, hidden]."""

        def __init__(self, projector, scale: int):
            super().__init__()
            self.projector, self.scale = projector, scale

        def forward(self, vision_hidden):
            return self.projector(pixel_shuffle_tokens(vision_hidden[:, 1:], self.scale))

    return VisionEncoder, Projector


def image_seq_length(config) -> int:
    vc = config.vision_config
    side = vc.image_size[0] // vc.patch_size[0]
    return int(side * side * config.downsample_ratio**2)


class InternVLReference:
    image_processor_class = "transformers.models.got_ocr2.image_processing_pil_got_ocr2:GotOcr2ImageProcessorPil"

    def processor(self, model, model_dir: Path):
        """InternVLProcessor for images and text (its video processor needs torchvision; images never reach it)."""
        import importlib

        import transformers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        module, cls = self.image_processor_class.split(":")
        ip = getattr(importlib.import_module(module), cls).from_pretrained(model_dir, local_files_only=True)

        class ImagesOnly(transformers.InternVLProcessor):
            def check_argument_for_proper_class(self, name, arg):
                return None if arg is None and name == "video_processor" else super().check_argument_for_proper_class(name, arg)

        return ImagesOnly(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_length=image_seq_length(model.config))

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        proc = self.processor(model, model_dir)
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = proc(images=list(images) or None, text=text, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values")}

    @staticmethod
    def tiles_per_image(ids, image_token_id: int, seq_len: int) -> list[int]:
        """Each image is one run of image tokens, seq_len per tile."""
        counts, run = [], 0
        for t in [*ids, None]:
            if t == image_token_id:
                run += 1
            elif run:
                counts.append(run // seq_len)
                run = 0
        return counts

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy(), "position_ids": torch.arange(ids.shape[1])[None].numpy()}
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                cfg = model.config
                feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
                counts = self.tiles_per_image(ids[0].tolist(), cfg.image_token_id, image_seq_length(cfg))
                ref["pixel_values"] = [t.numpy() for t in torch.split(inputs["pixel_values"], counts)]
                ref["vision_encoder"] = [h.numpy() for h in torch.split(feats.last_hidden_state, counts)]
                flat = feats.pooler_output.reshape(-1, feats.pooler_output.shape[-1])
                ref["projector"] = [e.reshape(-1, e.shape[-1]).numpy() for e in torch.split(feats.pooler_output, counts)]
                mask = (ids == cfg.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, flat)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        from ..checks import method_a_checks

        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}


class InternVLAdapter(InternVLReference, FamilyAdapter):
    model_class = "InternVLForConditionalGeneration"

    def check_checkpoint(self, model_dir: Path) -> dict[str, Any]:
        cfg = super().check_checkpoint(model_dir)
        if cfg.get("vision_feature_layer", -1) != -1 or cfg.get("vision_feature_select_strategy", "default") != "default":
            raise UserError(f"{model_dir}: vision_feature_layer {cfg.get('vision_feature_layer')} / strategy "
                            f"{cfg.get('vision_feature_select_strategy')!r}: mmexport exports the last layer without the "
                            "class token (-1, 'default') only")
        return cfg

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 2}

    # -- checkpoints ---------------------------------------------------------------------------
    def synthetic_parts(self, syn: dict[str, Any]):
        import torch
        from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tok = train_bpe_tokenizer(SPECIAL_TOKENS, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        text = dict(syn["text_config"])
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"],
                    tie_word_embeddings=tie)
        vision = dict(syn["vision_config"])
        side = int(vision["image_size"])
        vision.update(image_size=[side, side], patch_size=[int(vision["patch_size"])] * 2)
        config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                                downsample_ratio=float(syn.get("downsample_ratio", 0.5)), tie_word_embeddings=tie)
        config.image_seq_length = image_seq_length(config)
        seed = int(syn.get("seed", 0))
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                if name.endswith(("lambda_1", "lambda_2")):  # layer scale: random, so a wrong one shows
                    p.copy_(torch.empty(p.shape).uniform_(0.3, 1.2, generator=gen))
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * float(syn.get("init_std", 0.08)))
        generation = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=eos, do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            extra_special_tokens=EXTRA_TOKENS)
        tokenizer.chat_template = CHAT_TEMPLATE
        pre = {"size": {"height": side, "width": side}, "crop_to_patches": False, **dict(syn.get("preprocessor", {}))}
        return model, tokenizer, GotOcr2ImageProcessorPil(**pre), generation

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> InternVLImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return InternVLImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def _sizes(self, model, model_dir: Path) -> dict[str, int]:
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        pre = self._preprocessor(model_dir)
        if pre.tile != vc.image_size[0] or vc.image_size[0] != vc.image_size[1]:
            raise UserError(f"{model_dir}: the preprocessor's tiles ({pre.tile} px) are not the vision model's "
                            f"image_size ({vc.image_size})")
        side = vc.image_size[0] // vc.patch_size[0]
        scale = round(1 / cfg.downsample_ratio)
        if side % scale or abs(scale * cfg.downsample_ratio - 1) > 1e-9:
            raise UserError(f"{model_dir}: downsample_ratio {cfg.downsample_ratio} does not divide the {side}x{side} patch grid")
        return dict(tile=pre.tile, tokens=side * side + 1, dim=vc.hidden_size, seq=image_seq_length(cfg), scale=scale,
                    hidden=tc.hidden_size, max_tiles=pre.max_tiles())

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        s = self._sizes(model, model_dir)
        f = "float32"
        tiles = Dim("num_tiles", 1, min(s["max_tiles"], 7), s["max_tiles"])
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(TensorSpec("pixel_values", f, ("num_tiles", 3, s["tile"], s["tile"]), "one image's tiles, thumbnail last"),),
                outputs=(TensorSpec("vision_hidden", f, ("num_tiles", s["tokens"], s["dim"]), "class token first"),),
                dims={"num_tiles": tiles},
                doc="InternViT over a batch of tiles, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, ("num_tiles", s["tokens"], s["dim"])),),
                outputs=(TensorSpec("image_embeds", f, ("num_tiles", s["seq"], s["hidden"])),),
                dims={"num_tiles": tiles},
                doc="drop the class token, pixel shuffle, MLP projector",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         doc=f"{tc.model_type} decoder over a static KV cache (capacity = context)"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        VisionEncoder, Projector = vision_modules()
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        s = self._sizes(model, model_dir)
        d = specs["vision_encoder"].dims["num_tiles"]
        n = next((k for k in (3, 2, d.max) if d.min <= k <= d.max and k != d.opt), d.max)
        g = torch.Generator().manual_seed(1234)
        lm = model.model.language_model
        B = min(2, specs["embed_tokens"].dims["batch"].max)
        return [
            ExportComponent(specs["vision_encoder"], VisionEncoder(model.model.vision_tower).eval(),
                            {"pixel_values": torch.randn(n, 3, s["tile"], s["tile"], generator=g)}),
            ExportComponent(specs["projector"], Projector(model.model.multi_modal_projector, s["scale"]).eval(),
                            {"vision_hidden": torch.randn(n, s["tokens"], s["dim"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, model.config.text_config.vocab_size, (B, 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], lm, model.lm_head).eval(), decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        s = self._sizes(model, model_dir)
        tc = model.config.text_config
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "image_token": "<IMG_CONTEXT>",
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "vision": {"tile": s["tile"], "image_seq_length": s["seq"], "scale": s["scale"]},
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "vocab_size": tc.vocab_size},
            "tokens": {"image_token_id": int(model.config.image_token_id)},
        }
