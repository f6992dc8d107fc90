"""Qwen3-VL's PyTorch references for verify, taskeval and bench: transformers' Qwen3VLProcessor (tokenizer +
the PIL Qwen2-VL image processor Qwen3-VL uses) and the model; torch imported when used."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..qwen2_vl.reference import Qwen2VLReference


class Qwen3VLReference(Qwen2VLReference):
    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """Qwen3VLProcessor's output for the chat-rendered prompt and the images (no video processor: images only)."""
        import importlib

        from transformers import AutoTokenizer, Qwen3VLProcessor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        module, cls = self.image_processor_class.split(":")
        ip = getattr(importlib.import_module(module), cls).from_pretrained(model_dir, local_files_only=True)
        class ImagesOnly(Qwen3VLProcessor):
            # without torchvision transformers cannot name the video processor's base class: check it only
            # when there is one (images never reach it)
            def check_argument_for_proper_class(self, name, arg):
                return None if arg is None and name == "video_processor" else super().check_argument_for_proper_class(name, arg)

        proc = ImagesOnly(image_processor=ip, tokenizer=tok, video_processor=None)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(proc(images=list(images) or None, text=text, return_tensors="pt"))

    def _vision_reference(self, model, inputs: dict[str, Any], ref: dict[str, Any]):
        """Per image: the last hidden states and those after each deepstack block (vision_encoder), image and
        deepstack embeddings (projector); the deepstack features scattered to the prompt's image positions
        (the decoder's deepstack_embeds input)."""
        import torch

        visual = model.model.visual
        grid = inputs["image_grid_thw"]
        deep: dict[int, Any] = {}
        hooks = [visual.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: deep.__setitem__(i, out))
                 for i in visual.deepstack_visual_indexes]
        try:
            vis = visual(inputs["pixel_values"], grid_thw=grid)
        finally:
            for h in hooks:
                h.remove()
        sizes = grid.prod(-1).tolist()
        tokens = [s // visual.spatial_merge_unit for s in sizes]
        hidden = torch.stack([deep[i] for i in visual.deepstack_visual_indexes])  # [n_deep, P, dim]
        feats = torch.stack(list(vis.deepstack_features))  # [n_deep, T, hidden]
        ref["pixel_values"] = [p.numpy() for p in torch.split(inputs["pixel_values"], sizes)]
        ref["vision_encoder"] = [{"vision_hidden": h.numpy(), "deepstack_hidden": d.numpy()}
                                 for h, d in zip(torch.split(vis.last_hidden_state, sizes), torch.split(hidden, sizes, dim=1))]
        ref["projector"] = [{"image_embeds": e.numpy(), "deepstack_embeds": d.numpy()}
                            for e, d in zip(torch.split(vis.pooler_output, tokens), torch.split(feats, tokens, dim=1))]
        ids = inputs["input_ids"]
        scattered = torch.zeros(feats.shape[0], *ids.shape, feats.shape[-1])
        scattered[:, ids == model.config.image_token_id] = feats
        ref["decoder_inputs"] = {"deepstack_embeds": scattered.numpy()}
        return vis.pooler_output

    def eager_stage_modules(self, model) -> dict[str, Any]:
        # the deepstack mergers run inside the vision module and count as vision there
        return {"vision": model.model.visual, "projector": model.model.visual.merger}
