"""LLaVA-OneVision, export side: the shared tower adapter (families/towers.py) with OneVision's hooks.

  vision_encoder  SigLIP on a batch of views [num_images, 3, S, S] (an image's anyres tiles + base view, or one
                  padded view per image of a multi-image prompt): embeddings, the layers up to
                  `vision_feature_layer` (-1: all, without the post-norm), no class token ("full")
  projector       LlavaOnevisionMultiModalProjector (Linear, GELU, Linear), per view: [views, P, hidden]
  decoder         the Qwen2 text stack through the generic decoder (1D positions)

The unpadding, the anyres_max bilinear shrink and the image_newline tokens (pack_image_features) run on the host
(runtime.py) as a weighted gather; the newline vector travels in the manifest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import Dim
from ..towers import TowerAdapter, reference_tower_features
from .image import OnevisionImageParams, max_patches_of

CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "llava_onevision_chat_template.jinja"


class OnevisionAdapter(TowerAdapter):
    model_class = "LlavaOnevisionForConditionalGeneration"
    config_class = "LlavaOnevisionConfig"
    image_processor_class = ("transformers.models.llava_onevision.image_processing_pil_llava_onevision:"
                             "LlavaOnevisionImageProcessorPil")
    image_token = "<image>"
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
    eos_token, pad_token = "<|im_end|>", "<|endoftext|>"
    # llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json (as transformers' processor tests carry it)
    chat_template = CHAT_TEMPLATE_FILE.read_text()

    # -- hooks ---------------------------------------------------------------------------------------
    def _check(self, model) -> None:
        c = model.config
        if c.vision_feature_select_strategy != "full":
            raise UserError(f"LLaVA-OneVision with vision_feature_select_strategy {c.vision_feature_select_strategy!r}: "
                            "only 'full' is supported (the SigLIP tower has no class token to drop)")
        max_patches_of(c.vision_aspect_ratio)

    def feature_layers(self, model) -> list[int]:
        layer = model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def drop_cls(self, model) -> bool:
        self._check(model)
        return False

    def tokens_per_image(self, model) -> int:
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2  # per view

    def image_params(self, model_dir: Path) -> OnevisionImageParams:
        import json

        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return OnevisionImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def _images_dim(self, recipe: Recipe) -> Dim:
        """Views per vision call: one image's tiles + its base view (the most a pinpoint cuts), or the prompt's
        images in a multi-image prompt."""
        params = self.image_params(self._model_dir)
        most = max(1 + params.max_tiles, recipe.limits.max_images, 2)
        return Dim("num_images", 1, 1, most)

    def specs(self, model, recipe: Recipe, model_dir: Path):
        self._model_dir = model_dir  # _images_dim reads the pinpoints (components calls specs first)
        pins = [list(p) for p in model.config.image_grid_pinpoints]
        if pins != self.image_params(model_dir).grid_pinpoints:
            # the processor counts tokens with its pinpoints, the model lays features out with its own
            raise UserError(f"{model_dir}: config.json's image_grid_pinpoints differ from preprocessor_config.json's; "
                            "transformers would place the image features wrongly")
        return super().specs(model, recipe, model_dir)

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        out = super().runtime_config(model, model_dir, recipe)
        vc = model.config.vision_config
        out["tokens"]["video_token_id"] = int(model.config.video_token_id)
        out["onevision"] = {
            "side": vc.image_size // vc.patch_size,
            "vision_aspect_ratio": model.config.vision_aspect_ratio,
            # float32 values written as Python floats: exact through JSON
            "image_newline": [float(v) for v in model.model.image_newline.detach().float().numpy()],
        }
        return out

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 4}

    # -- reference ------------------------------------------------------------------------------------
    def processor(self, model, model_dir: Path):
        """LlavaOnevisionProcessor's image path from the tokenizer and the PIL image processor. Its constructor
        insists on a video processor (torchvision, absent here), so the instance is made without __init__ and
        given what replace_image_token reads; the expansion itself is transformers' code."""
        from transformers import AutoTokenizer, LlavaOnevisionProcessor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        vc = model.config.vision_config
        proc.tokenizer, proc.image_processor = tok, self.image_processor(model_dir)
        proc.num_image_tokens = (vc.image_size // vc.patch_size) ** 2
        proc.vision_feature_select_strategy = model.config.vision_feature_select_strategy
        proc.vision_aspect_ratio = model.config.vision_aspect_ratio
        proc.image_token = "<image>"
        return proc

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """As processor.apply_chat_template(tokenize=True) on one conversation: the images as one sample
        (`[[...]]`: one image -> anyres tiles, several -> one view each), each `<image>` expanded by the
        processor's replace_image_token, then tokenized."""
        import torch

        proc = self.processor(model, model_dir)
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, Any] = {}
        if images:
            iv = proc.image_processor([list(images)], return_tensors="pt")
            parts = text.split(proc.image_token)
            if len(parts) - 1 != len(images):
                raise UserError(f"{len(parts) - 1} <image> placeholders for {len(images)} images")
            reps = [proc.replace_image_token(iv, i) for i in range(len(images))]
            text = parts[0] + "".join(r + rest for r, rest in zip(reps, parts[1:]))
            out.update(pixel_values=iv["pixel_values"], image_sizes=iv["image_sizes"], batch_num_images=iv["batch_num_images"])
        enc = proc.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out

    def reference_features(self, model, pixel_values):
        """Per view (vision_hidden [N, P, D], image_embeds [N, P, hidden]): transformers' tower selection and its
        projector module (get_image_features packs whole images; verify compares the packing per image)."""
        vision = reference_tower_features(self.vision_tower(model), pixel_values, self.feature_layers(model), False)
        return vision, self.projector(model)(vision)

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                       batch_num_images=inputs["batch_num_images"]).pooler_output
                packed = list(feats)
                ref["pixel_values"], ref["vision_encoder"], ref["projector"] = [], [], []
                for i, views in enumerate(self._views(model, inputs)):
                    vision = reference_tower_features(self.vision_tower(model), views, self.feature_layers(model), False)
                    ref["pixel_values"].append(views.numpy())
                    ref["vision_encoder"].append(vision.numpy())
                    ref["projector"].append(packed[i].numpy())
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, torch.cat(packed))
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["position_ids"] = torch.arange(ids.shape[1])[None].numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def _views(self, model, inputs: dict[str, Any]) -> list:
        """Each image's views as transformers cuts them out of the batch-padded pixel_values."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        pv, sizes, per = inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"].tolist()
        patching = [n == 1 for n in per for _ in range(n)]
        out = []
        for i, (size, patch) in enumerate(zip(sizes, patching)):
            n = image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size) if patch else 1
            out.append(pv[i, :n])
        return out

    # -- synthetic checkpoints ---------------------------------------------------------------------------
    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        from transformers import LlavaOnevisionConfig

        text = {"model_type": "qwen2", **dict(syn["text_config"])}
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie)
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False, **dict(syn["vision_config"])}
        pre = dict(syn.get("preprocessor", {}))
        extra = {k: syn[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                                     "projector_hidden_act") if k in syn}
        return LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                                    video_token_id=ids["<video>"], tie_word_embeddings=tie,
                                    image_grid_pinpoints=pre.get("image_grid_pinpoints"), **extra)
