"""LLaVA-1.5, export side: the shared tower adapter (families/towers.py) with LLaVA's hooks.

  vision_encoder  CLIP ViT on [num_images, 3, 336, 336]: embeddings, pre-norm, the layers up to
                  `vision_feature_layer` (-2: the last layer never runs), class token dropped for the "default"
                  strategy (kept for "full"); a list of layers is concatenated along the width
  projector       LlavaMultiModalProjector (Linear, GELU, Linear), per token
  decoder         the Llama text stack through the generic decoder (1D positions)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..towers import TowerAdapter

CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "llava_chat_template.jinja"


class LlavaAdapter(TowerAdapter):
    model_class = "LlavaForConditionalGeneration"
    config_class = "LlavaConfig"
    processor_class = "transformers:LlavaProcessor"
    image_processor_class = "transformers.models.clip.image_processing_pil_clip:CLIPImageProcessorPil"
    image_token = "<image>"
    special_tokens = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"
    chat_template = CHAT_TEMPLATE_FILE.read_text()  # llava-hf/llava-1.5-7b-hf's chat_template.json, verbatim

    def _layers(self, model) -> list[int]:
        layer = model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def feature_layers(self, model) -> list[int]:
        return self._layers(model)

    def drop_cls(self, model) -> bool:
        return model.config.vision_feature_select_strategy == "default"

    def tokens_per_image(self, model) -> int:
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + (0 if self.drop_cls(model) else 1)

    def image_feature_kwargs(self, model) -> dict[str, Any]:
        c = model.config
        return {"vision_feature_layer": c.vision_feature_layer, "vision_feature_select_strategy": c.vision_feature_select_strategy}

    def image_params(self, model_dir: Path):
        import json

        p = model_dir / "preprocessor_config.json"
        cfg = json.loads(p.read_text()) if p.is_file() else {}
        if str(cfg.get("image_processor_type", "")).startswith("LlavaImageProcessor"):  # the pad-to-square variant
            self.image_processor_class = "transformers.models.llava.image_processing_pil_llava:LlavaImageProcessorPil"
        return super().image_params(model_dir)

    def processor(self, model, model_dir: Path):
        from transformers import AutoTokenizer, LlavaProcessor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.image_params(model_dir)  # picks the image processor class the checkpoint names
        vc = model.config.vision_config
        return LlavaProcessor(image_processor=self.image_processor(model_dir), tokenizer=tok, patch_size=vc.patch_size,
                              vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, chat_template=tok.chat_template)

    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        from transformers import LlavaConfig

        text = {"model_type": "llama", **dict(syn["text_config"])}
        tie = bool(text.pop("tie_word_embeddings", False))
        text.update(vocab_size=vocab, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                    tie_word_embeddings=tie)
        vision = {"model_type": "clip_vision_model", **dict(syn["vision_config"])}
        extra = {k: syn[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act") if k in syn}
        vc = vision
        cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"], tie_word_embeddings=tie,
                          image_seq_length=(vc["image_size"] // vc["patch_size"]) ** 2, **extra)
        return cfg
