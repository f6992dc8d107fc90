"""Mistral 3's PyTorch references for verify, taskeval and bench (transformers' tokenizer, PIL Pixtral image
processor and model; torch imported when used)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checks import method_a_checks


def processor_inputs(model_dir: Path, text: str, images: list[Any]) -> dict[str, Any]:
    """What PixtralProcessor(images=..., text=..., return_tensors="pt") returns for a rendered prompt that starts
    with the BOS token (so no special tokens are added), built from transformers' tokenizer and
    PixtralImageProcessorPil.

    PixtralProcessor's module imports the torchvision image processor, so without torchvision it cannot be
    imported; its image path is exactly: process the images with patch_size = patch_size * spatial_merge_size,
    then `replace_image_token` (copied below) for each `[IMG]`, then tokenize. tests/data/mistral3_processor.npz
    holds the real processor's output (scripts/mistral3_processor_golden.py) and the tests compare with it.
    """
    from transformers import AutoTokenizer
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pcfg = json.loads((model_dir / "processor_config.json").read_text())
    patch = int(pcfg.get("patch_size", 16)) * int(pcfg.get("spatial_merge_size", 1))
    image_token = pcfg.get("image_token", "[IMG]")
    brk, end = pcfg.get("image_break_token", "[IMG_BREAK]"), pcfg.get("image_end_token", "[IMG_END]")
    out: dict[str, Any] = {}
    if images:
        ip = PixtralImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        iv = ip(images=list(images), patch_size={"height": patch, "width": patch}, return_tensors="pt")
        parts = text.split(image_token)
        expanded = [parts[0]]
        for (height, width), rest in zip(iv["image_sizes"].tolist(), parts[1:]):
            # PixtralProcessor.replace_image_token
            rows = [[image_token] * (width // patch) + [brk]] * (height // patch)
            flat = [t for row in rows for t in row]
            flat[-1] = end
            expanded += ["".join(flat), rest]
        text = "".join(expanded)
        out["pixel_values"] = iv["pixel_values"]
        out["image_sizes"] = iv["image_sizes"]
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out["input_ids"] = enc["input_ids"]
    out["attention_mask"] = enc["attention_mask"]
    return out


class Mistral3Reference:
    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # Mistral's -hf checkpoints keep the template in chat_template.json (the processor's), where the build
        # reads it too; transformers' processor renders it with the tokenizer's special tokens
        d = Path(model_dir)
        template = ((d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").is_file()
                    else json.loads((d / "chat_template.json").read_text()).get("chat_template") if (d / "chat_template.json").is_file()
                    else None)
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        return processor_inputs(d, text, images)

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        from .export import feature_layers

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        m = model.model
        with torch.no_grad():
            embeds = m.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                vc = model.config.vision_config
                layers = feature_layers(model.config, vc.num_hidden_layers)
                ref["pixel_values"], ref["vision_encoder"], ref["projector"] = [], [], []
                for pv, (h, w) in zip(inputs["pixel_values"], inputs["image_sizes"].tolist()):
                    one = pv[None, :, :h, :w]  # the batch padding cropped off: the tower sees each image at its size
                    states = m.vision_tower(one, image_sizes=torch.tensor([[h, w]]), output_hidden_states=True).hidden_states
                    feats = torch.cat([states[i] for i in layers], -1)[0]  # [P, features]
                    ref["pixel_values"].append(one[0].numpy())
                    ref["vision_encoder"].append(feats.reshape(h // vc.patch_size, w // vc.patch_size, -1).numpy())
                    ref["projector"].append(m.multi_modal_projector(feats, torch.tensor([[h, w]])).numpy())
                # transformers' own batched path (padding, block mask, split sizes) for the merged embeddings
                image = torch.cat(m.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output)
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, image)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}
