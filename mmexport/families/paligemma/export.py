"""PaliGemma / PaliGemma 2, export side: the shared tower adapter (families/towers.py) with PaliGemma's hooks.

  vision_encoder  SigLIP on [num_images, 3, 224, 224] (all layers + post-norm: transformers' last_hidden_state)
  projector       PaliGemmaMultiModalProjector (Linear)
  decoder         the Gemma / Gemma 2 text stack through the generic decoder: its own embedding scale, soft-capping
                  of scores and logits, sliding windows; extra input image_block_ids (the whole prompt is one
                  bidirectional block: prefix-LM), positions from 1
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..towers import TowerAdapter

# PaliGemmaProcessor's prompt (`<image>` per image, BOS, the text, "\n") for the runtime, which renders prompts with a
# chat template: the user turns' images first, then their texts. The checkpoints ship no chat template.
PROMPT_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}<image>{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{{ '\\n' }}"
)


class PaliGemmaAdapter(TowerAdapter):
    model_class = "PaliGemmaForConditionalGeneration"
    config_class = "PaliGemmaConfig"
    image_processor_class = "transformers.models.siglip.image_processing_pil_siglip:SiglipImageProcessorPil"
    image_token = "<image>"
    special_tokens = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    special_tokens_rule = "never"  # the processor switches the tokenizer's BOS off and writes it itself

    def tokens_per_image(self, model) -> int:
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def attention_blocks(self, model) -> str:
        return "prompt"

    def position_offset(self, model) -> int:
        return 1

    def chat_template_for(self, model_dir: Path) -> str | None:
        return PROMPT_TEMPLATE

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 1}

    # -- reference ---------------------------------------------------------------------------------
    def processor(self, model, model_dir: Path):
        from transformers import AutoTokenizer, PaliGemmaProcessor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ip = self.image_processor(model_dir)
        if not hasattr(ip, "image_seq_length"):
            ip.image_seq_length = self.tokens_per_image(model)
        return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """PaliGemmaProcessor on `<image>` per image + the user's text (it adds BOS after the images and "\\n"). It refuses
        a prompt without images; a text-only prompt is the same string without images, tokenized as the processor
        tokenizes (no added special tokens), with token_type_ids 0 (all prefix)."""
        import torch

        proc = self.processor(model, model_dir)
        text = "".join(c["text"] for m in messages for c in (m["content"] if not isinstance(m["content"], str) else [{"type": "text", "text": m["content"]}])
                       if c["type"] == "text")
        if images:
            out = dict(proc(images=list(images), text=proc.image_token * len(images) + text, return_tensors="pt"))
        else:
            tok = proc.tokenizer
            out = dict(tok(tok.bos_token + text + "\n", add_special_tokens=False, return_tensors="pt"))
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}

    # -- synthetic ---------------------------------------------------------------------------------
    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        from transformers import PaliGemmaConfig

        text = {"model_type": "gemma2", **dict(syn["text_config"])}
        text.update(vocab_size=vocab, bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False, **dict(syn["vision_config"])}
        return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"], vocab_size=vocab,
                               projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])

    def synthetic_parts(self, syn: dict[str, Any]):
        model, tok, ip, gen = super().synthetic_parts(syn)
        vc = model.config.vision_config
        ip.image_seq_length = (vc.image_size // vc.patch_size) ** 2  # PaliGemmaProcessor reads it
        return model, tok, ip, gen
