"""Qwen2-VL's PyTorch references for verify, taskeval and bench (transformers' own tokenizer, image
processor and model; torch imported when used)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checks import method_a_checks


class Qwen2VLReference:
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    image_token = "<|image_pad|>"

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """What Qwen2VLProcessor produces, built from transformers' tokenizer and PIL image processor.

        (Qwen2VLProcessor itself insists on a video processor, which needs torchvision; its image path is
        exactly: process images, repeat each image token grid.prod() // merge**2 times, tokenize.)
        """
        import importlib

        import torch
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, Any] = {}
        if images:
            module, cls = self.image_processor_class.split(":")
            ip = getattr(importlib.import_module(module), cls).from_pretrained(model_dir, local_files_only=True)
            iv = ip(images=images, return_tensors="pt")
            merge = ip.merge_size**2
            parts = text.split(self.image_token)
            counts = [int(g.prod()) // merge for g in iv["image_grid_thw"]]
            text = parts[0] + "".join(self.image_token * n + rest for n, rest in zip(counts, parts[1:]))
            out["pixel_values"] = iv["pixel_values"]
            out["image_grid_thw"] = iv["image_grid_thw"]
        enc = tok(text, return_tensors="pt")
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == model.config.image_token_id).to(torch.int32)
        return out

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ref: dict[str, Any] = {"input_ids": inputs["input_ids"][0].numpy()}
        with torch.no_grad():
            ids = inputs["input_ids"]
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                grid = inputs["image_grid_thw"]
                image_embeds = self._vision_reference(model, inputs, ref)
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, image_embeds)
                pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grid)
                ref["position_ids"] = pos.numpy()
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def _vision_reference(self, model, inputs: dict[str, Any], ref: dict[str, Any]):
        """(hook) The vision tower's per-image references into `ref` (pixel_values, vision_encoder, projector);
        returns the image embeddings of all images, in prompt order."""
        import torch

        grid = inputs["image_grid_thw"]
        vis = model.model.visual(inputs["pixel_values"], grid_thw=grid)
        sizes = grid.prod(-1).tolist()
        merge = model.config.vision_config.spatial_merge_size ** 2
        ref["pixel_values"] = [p.numpy() for p in torch.split(inputs["pixel_values"], sizes)]
        ref["vision_encoder"] = [h.numpy() for h in torch.split(vis.last_hidden_state, sizes)]
        ref["projector"] = [h.numpy() for h in torch.split(vis.pooler_output, [s // merge for s in sizes])]
        return vis.pooler_output

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.visual, "projector": model.model.visual.merger}
