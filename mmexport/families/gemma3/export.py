"""Gemma 3, export side: the shared tower adapter (families/towers.py) with Gemma 3's hooks.

  vision_encoder  SigLIP on [num_images, 3, 896, 896] (transformers' last_hidden_state: all layers + post-norm)
  projector       Gemma3MultiModalProjector: average pooling to mm_tokens_per_image, RMSNorm, matmul
  decoder         the Gemma 3 text stack through the generic decoder (sliding-window and global layers, local and
                  global rotary, its scaled embedding); extra input image_block_ids (bidirectional within an image)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..towers import TowerAdapter

# google/gemma-3-4b-it's chat template (tokenizer_config.json / chat_template.json), verbatim
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "gemma3_chat_template.jinja"


class Gemma3Adapter(TowerAdapter):
    model_class = "Gemma3ForConditionalGeneration"
    config_class = "Gemma3Config"
    image_processor_class = "transformers.models.gemma3.image_processing_pil_gemma3:Gemma3ImageProcessorPil"
    image_token = "<start_of_image>"  # what the chat template writes per image
    special_tokens = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                      "<end_of_image>", "<image_soft_token>")
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    extra_eos_tokens = ("<end_of_turn>",)
    chat_template = CHAT_TEMPLATE_FILE.read_text()

    def tokens_per_image(self, model) -> int:
        return int(model.config.mm_tokens_per_image)

    def attention_blocks(self, model) -> str:
        return "image"

    def window_limits_blocks(self, model) -> bool:
        return True  # transformers' sliding layers: AND(sliding_window, OR(causal, blockwise))

    def image_sequence(self, model) -> dict[str, str]:
        return {"before": "\n\n<start_of_image>", "token": "<image_soft_token>", "after": "<end_of_image>\n\n"}

    def processor(self, model, model_dir: Path):
        from transformers import AutoTokenizer, Gemma3Processor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return Gemma3Processor(image_processor=self.image_processor(model_dir), tokenizer=tok,
                               image_seq_length=self.tokens_per_image(model), chat_template=tok.chat_template)

    def synthetic_tokenizer_kwargs(self, ids: dict[str, int]) -> dict[str, Any]:
        return {"extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                         "image_token": "<image_soft_token>"}}

    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        from transformers import Gemma3Config

        text = {"model_type": "gemma3_text", **dict(syn["text_config"])}
        text.update(vocab_size=vocab, bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                    pad_token_id=ids["<pad>"])
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False, **dict(syn["vision_config"])}
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=int(syn["mm_tokens_per_image"]),
                            boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                            image_token_index=ids["<image_soft_token>"])
