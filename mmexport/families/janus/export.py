"""Janus / Janus-Pro (Method A), export side, image understanding only: the shared fixed-tower adapter
(families/towers.py) with Janus's hooks.

  vision_encoder  the SigLIP-style tower (JanusVisionModel) on [num_images, 3, S, S]: patch conv + fixed position
                  embedding, the encoder layers, the post-layernorm (its last_hidden_state; no class token)
  projector       the aligner (JanusVisionAlignerMLP: fc1, then GELU + Linear per further layer), per token
  decoder         the Llama text stack through the generic decoder (1D positions)

The image-generation half of the checkpoint (VQ model, generation embeddings / aligner / head) is not exported;
`generate` is compared in its text mode (generation_mode="text", the default: no classifier-free guidance, the LM
head).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ..towers import TowerAdapter
from .image import JanusImageParams

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
# The DeepSeek tokenizer's special tokens as the Janus checkpoints use them (image tokens, chat roles, grounding).
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE_TOKEN, "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
                  "<|grounding|>", "<|User|>", "<|Assistant|>", BOI_TOKEN, EOI_TOKEN)

# The chat template transformers' Janus conversion (convert_janus_weights_to_hf.py) writes into the
# deepseek-community/Janus(-Pro) checkpoints, verbatim.
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "janus_chat_template.jinja"


def _read_json(p: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: not a JSON object")
    return cfg


def processor_config(model_dir: Path) -> dict[str, Any]:
    """processor_config.json of a checkpoint ({} when absent): num_image_tokens, use_default_system_prompt and, as
    transformers 5.x saves a processor, the image processor's settings under "image_processor"."""
    p = Path(model_dir) / "processor_config.json"
    return _read_json(p) if p.is_file() else {}


class JanusAdapter(TowerAdapter):
    model_class = "JanusForConditionalGeneration"
    image_processor_class = "transformers.models.janus.image_processing_pil_janus:JanusImageProcessorPil"
    image_token = IMAGE_TOKEN
    special_tokens = SPECIAL_TOKENS
    bos_token, eos_token, pad_token = BOS, EOS, PAD
    chat_template = CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")

    # -- tower hooks -------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.vision_model

    def projector(self, model):
        return model.model.aligner

    def tokens_per_image(self, model) -> int:
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def image_params(self, model_dir: Path) -> JanusImageParams:
        """JanusImageProcessor's settings: preprocessor_config.json (the Hub checkpoints), else processor_config.json's
        "image_processor" (a processor saved by transformers 5.x)."""
        p = Path(model_dir) / "preprocessor_config.json"
        cfg = _read_json(p) if p.is_file() else processor_config(model_dir).get("image_processor")
        if not isinstance(cfg, dict):
            raise UserError(f"{model_dir}: no preprocessor_config.json and no image_processor in processor_config.json "
                            "(needed for image preprocessing)")
        return JanusImageParams.from_preprocessor_config(cfg)

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 2}  # 576 tokens per image at 384x384

    # -- synthetic checkpoints ---------------------------------------------------------------------
    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        from transformers import JanusConfig

        text = {"model_type": "llama", **dict(syn["text_config"])}
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], tie_word_embeddings=tie)
        vision = dict(syn["vision_config"])
        vision["num_image_tokens"] = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        # the image-generation half (never exported) at its smallest
        vq = dict(syn.get("vq_config") or dict(embed_dim=4, num_embeddings=32, latent_channels=32, base_channels=32,
                                               channel_multiplier=[1, 1], num_res_blocks=1))
        vq.update(projection_dim=text["hidden_size"], image_token_embed_dim=text["hidden_size"])
        return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids[IMAGE_TOKEN], tie_word_embeddings=tie)

    def synthetic_tokenizer_kwargs(self, ids: dict[str, int]) -> dict[str, Any]:
        return {"extra_special_tokens": {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}}

    def synthetic_parts(self, syn: dict[str, Any]):
        """(model, processor, image processor, generation config): the shared tiny checkpoint, its tokenizer and image
        processor saved as a JanusProcessor (processor_config.json: num_image_tokens, use_default_system_prompt as
        released)."""
        from transformers import JanusProcessor
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        model, tokenizer, _, generation = super().synthetic_parts(syn)
        ids = tokenizer.convert_tokens_to_ids
        generation.guidance_scale, generation.boi_token_id = 5, ids(BOI_TOKEN)  # as released (for image generation)
        side = model.config.vision_config.image_size
        ip = JanusImageProcessorPil(size={"height": side, "width": side}, **dict(syn.get("preprocessor", {})))
        processor = JanusProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=self.chat_template,
                                   use_default_system_prompt=bool(syn.get("use_default_system_prompt", True)),
                                   num_image_tokens=self.tokens_per_image(model))
        return model, processor, ip, generation  # ip: preprocessor_config.json too, as the Hub checkpoints have it

    # -- runtime configuration ---------------------------------------------------------------------
    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        """The shared tower table plus what JanusProcessor does to a prompt: its placeholder count (checked against
        the tower), the image start/end tokens around the placeholders (the towers' image_sequence, with the
        tokenizer's own names), and the system prompt it prepends (DEFAULT_SYSTEM_PROMPT when
        processor_config.json says use_default_system_prompt)."""
        from transformers import AutoTokenizer
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        out = super().runtime_config(model, model_dir, recipe)
        pc = processor_config(model_dir)
        n = int(pc.get("num_image_tokens", 576))  # JanusProcessor's default
        if n != out["tokens_per_image"]:
            raise UserError(f"{model_dir}: processor_config.json says {n} image tokens per image, but the vision tower "
                            f"emits {out['tokens_per_image']}")
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        named = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}
        named = {k: getattr(tok, k, None) or v for k, v in named.items()}
        if tok.convert_tokens_to_ids(named["image_token"]) != out["tokens"]["image_token_id"]:
            raise UserError(f"{model_dir}: the tokenizer's {named['image_token']} is not config.json's image_token_id")
        out["image_token"] = named["image_token"]
        out["image_sequence"] = {"before": named["boi_token"], "token": named["image_token"], "after": named["eoi_token"]}
        out["system_prompt"] = DEFAULT_SYSTEM_PROMPT if pc.get("use_default_system_prompt", False) else ""
        return out

    # -- references --------------------------------------------------------------------------------
    def processor(self, model, model_dir: Path):
        """JanusProcessor as the checkpoint saves it, with transformers' PIL image processor."""
        from transformers import AutoTokenizer, JanusProcessor
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        ip = JanusImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return JanusProcessor.from_pretrained(model_dir, image_processor=ip, tokenizer=tok, local_files_only=True)

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """JanusProcessor's output in text mode (the understanding path) for the chat-rendered prompt; text-only
        prompts go through the processor too (it adds the system prompt)."""
        proc = self.processor(model, model_dir)
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = proc(text=text, images=list(images) or None, generation_mode="text", return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in out}

    def reference_generate(self, model, inputs: dict[str, Any], n: int) -> list[int]:
        """transformers' greedy generate in Janus's text mode (generation_mode="text": guidance off, the LM head)."""
        import torch

        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, generation_mode="text")
        return out[0, inputs["input_ids"].shape[1]:].tolist()
