"""Molmo2's PyTorch references for verify, taskeval and bench (torch imported when used).

transformers' `Molmo2Processor` needs torchvision (its image and video processors have only a torchvision
backend), which mmexport does not depend on. The reference here is built from transformers' own pieces:
the checkpoint's tokenizer and chat template, `Molmo2ImageProcessor` (with torchvision when it is installed;
otherwise its two torchvision calls — `resize(antialias=False)` of a float image and `normalize` — done by
the PyTorch calls torchvision makes for them, `F.interpolate(mode="bilinear")` and `(x - mean) / std`), and
`Molmo2Processor`'s own `replace_image_token` and BOS rule. scripts/molmo2_golden.py checks the runtime
against the real processor with torchvision.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..checks import method_a_checks


def image_processor(model_dir: Path):
    """transformers' Molmo2ImageProcessor for the checkpoint (its torchvision calls replaced when torchvision is
    absent, see the module docstring)."""
    from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
    from transformers.utils import is_torchvision_available

    cls = Molmo2ImageProcessor
    if not is_torchvision_available():
        import torch
        import torch.nn.functional as F

        class Molmo2ImageProcessorNoTorchvision(Molmo2ImageProcessor):
            def resize(self, image, size, resample=None, antialias=True, **kwargs):
                if antialias or resample not in (None, 2):
                    raise NotImplementedError("only bilinear resizing without antialiasing is reproduced")
                return F.interpolate(image, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=False)

            def normalize(self, image, mean, std, inplace=False, **kwargs):
                mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
                std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
                return (image - mean) / std

        cls = Molmo2ImageProcessorNoTorchvision
    return cls.from_pretrained(model_dir, local_files_only=True)


def processor_options(model_dir: Path) -> dict[str, Any]:
    """Molmo2Processor's prompt options from processor_config.json (its defaults where absent)."""
    import json

    cfg: dict[str, Any] = {}
    p = Path(model_dir) / "processor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
    return {"image_use_col_tokens": cfg.get("image_use_col_tokens", True),
            "use_single_crop_col_tokens": cfg.get("use_single_crop_col_tokens"),
            "use_single_crop_start_token": cfg.get("use_single_crop_start_token", True)}


class Molmo2Reference:
    image_token = "<|image|>"

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        import numpy as np
        import torch
        from transformers import AutoTokenizer
        from transformers.models.molmo2.processing_molmo2 import Molmo2Processor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, Any] = {}
        if images:
            iv = image_processor(model_dir)(images=images, return_tensors="pt")
            proc = SimpleNamespace(**processor_options(model_dir))
            parts = text.split(self.image_token)
            text = parts[0] + "".join(Molmo2Processor.replace_image_token(proc, iv, i) + rest for i, rest in enumerate(parts[1:]))
            out.update({k: iv[k] for k in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops")})
        bos = tok.bos_token or tok.eos_token  # Molmo2Processor.__call__
        if not text.startswith(bos):
            text = bos + text
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        block = tok.convert_tokens_to_ids(["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>", "<im_low>"])
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        out["mm_token_type_ids"] = torch.from_numpy(np.isin(enc["input_ids"].numpy(), block).astype(np.int64))
        return out

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        from .export import feature_layers

        ref: dict[str, Any] = {"input_ids": inputs["input_ids"][0].numpy()}
        m = model.model
        with torch.no_grad():
            ids = inputs["input_ids"]
            embeds = m.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                crops = inputs["image_num_crops"].tolist()
                tokens = [int(g[0] * g[1] + g[2] * g[3]) for g in inputs["image_grids"]]
                taps = feature_layers(len(m.vision_tower.layers), model.config.adapter_config.vision_feature_layer)
                ref["pixel_values"], ref["vision_encoder"], ref["projector"] = [], [], []
                feats = []
                for pv, pool in zip(torch.split(inputs["pixel_values"], crops), torch.split(inputs["image_token_pooling"], tokens)):
                    hs = m.vision_tower(pv, output_hidden_states=True).hidden_states
                    f = torch.cat([hs[i] for i in taps], dim=-1)
                    emb = m.multi_modal_projector(f, pool).last_hidden_state
                    ref["pixel_values"].append(pv.numpy())
                    ref["vision_encoder"].append({"image_features": f.numpy()})
                    ref["projector"].append({"image_embeds": emb.numpy()})
                    feats.append(emb)
                # the model's own merge: the features of all images, through get_image_features, added onto the
                # image-patch tokens' embeddings
                merged = m.get_image_features(inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"],
                                              inputs["image_num_crops"]).pooler_output
                mask = ids[0] == model.config.image_token_id
                embeds = embeds.clone()
                embeds[0, mask] += torch.cat(merged)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}
