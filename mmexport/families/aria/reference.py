"""Aria's PyTorch references for verify, taskeval and bench: transformers' AriaProcessor (the tokenizer and
AriaImageProcessorPil) and AriaForConditionalGeneration; torch imported when used."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checks import method_a_checks


def processor_size_conversion(model_dir: Path) -> dict[int, int] | None:
    """AriaProcessor's `size_conversion` (crop pixels -> <|img|> tokens per crop) from processor_config.json, if any."""
    import json

    p = Path(model_dir) / "processor_config.json"
    if not p.is_file():
        return None
    conv = json.loads(p.read_text()).get("size_conversion")
    return None if conv is None else {int(k): int(v) for k, v in conv.items()}


def aria_processor(model_dir: Path):
    """AriaProcessor from a checkpoint directory with the PIL image processor, and the image kwargs the
    checkpoint's preprocessor_config.json asks for (AriaProcessor's own call defaults are 980 / no split)."""
    from transformers import AriaProcessor, AutoTokenizer
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ip = AriaImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    proc = AriaProcessor(image_processor=ip, tokenizer=tok, size_conversion=processor_size_conversion(model_dir))
    return proc, {"max_image_size": ip.max_image_size, "split_image": ip.split_image}


class AriaReference:
    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        proc, kw = aria_processor(model_dir)
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = dict(proc(text=text, images=list(images) or None, return_tensors="pt", **kw))
        if images:
            crops = [proc.image_processor.get_number_of_image_patches(im.height, im.width, kw) for im in images]
            if len(set(crops)) > 1:
                # AriaProcessor expands every image to the call's largest crop count (`num_crops`), so its prompt
                # holds more <|img|> tokens than transformers' model computes features for (the model raises)
                from ...errors import UserError

                raise UserError(f"these images split into {crops} crops; AriaProcessor gives each the largest count, which "
                                "transformers' Aria cannot run: compare with images of equal crop counts")
            out["crops_per_image"] = crops
        out.pop("num_crops", None)
        return out

    def reference_generate(self, model, inputs: dict[str, Any], n: int) -> list[int]:
        import torch

        inputs = {k: v for k, v in inputs.items() if k != "crops_per_image"}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        feed = {k: v for k, v in inputs.items() if k != "crops_per_image"}
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                pv, mask = inputs["pixel_values"], inputs["pixel_mask"]
                layer = model.config.vision_feature_layer
                feats = model.model.get_image_features(pixel_values=pv, pixel_mask=mask, vision_feature_layer=layer, return_dict=True)
                crops = inputs["crops_per_image"]
                ref["pixel_values"] = [p.numpy() for p in torch.split(pv, crops)]
                ref["vision_encoder"] = [h.numpy() for h in torch.split(feats.hidden_states[layer], crops)]
                image_embeds = feats.pooler_output  # [crops, queries, hidden]
                ref["projector"] = [e.reshape(-1, e.shape[-1]).numpy() for e in torch.split(image_embeds, crops)]
                where = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(where, image_embeds.reshape(-1, image_embeds.shape[-1]))
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**feed).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}
