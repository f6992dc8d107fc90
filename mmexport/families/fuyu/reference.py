"""Fuyu's PyTorch references for verify, taskeval and bench: transformers' FuyuProcessor (prompt layout,
placeholder expansion, tokenization, crop + patchify) over the PIL image processor, and FuyuForCausalLM.

transformers 5.x's FuyuImageProcessorPil returns torch tensors to FuyuProcessor but patchifies with numpy
calls (`transpose(0, 1, 3, 2, 4)` on a torch tensor), so FuyuProcessor fails with it; the torchvision
processor (FuyuImageProcessor) works but needs torchvision. The reference uses FuyuImageProcessor when
torchvision is installed, else FuyuImageProcessorPil with the torchvision class's patchify (`unfold`, torch
only): everything else is transformers' own code. The two classes resize (only images larger than the canvas)
with different rounding; the runtime follows torchvision's, and tests/data/fuyu_golden.npz
(scripts/fuyu_golden.py, run with torchvision) checks it against the unmodified torchvision path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pil_processor_class():
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    class FuyuImageProcessorPilTorchPatchify(FuyuImageProcessorPil):
        def patchify_image(self, image, patch_size=None):
            # FuyuImageProcessor.patchify_image (the torchvision class), which needs only torch
            ph, pw = (patch_size or self.patch_size)["height"], (patch_size or self.patch_size)["width"]
            b, c = image.shape[:2]
            patches = image.unfold(2, ph, ph).unfold(3, pw, pw).contiguous().view(b, c, -1, ph, pw)
            return patches.permute(0, 2, 3, 4, 1).reshape(b, -1, c * ph * pw)

    return FuyuImageProcessorPilTorchPatchify


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text FuyuProcessor is given: the chat's text parts in order (Fuyu has no chat template)."""
    out = []
    for m in messages:
        c = m["content"]
        out += [c] if isinstance(c, str) else [p["text"] for p in c if p.get("type") == "text"]
    return "".join(out)


class FuyuReference:
    def reference_processor(self, model_dir: Path):
        from transformers import AutoTokenizer, FuyuProcessor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        try:
            from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor as cls

            import torchvision  # noqa: F401
        except ImportError:
            cls = _pil_processor_class()
        ip = cls.from_pretrained(model_dir, local_files_only=True)
        return FuyuProcessor(image_processor=ip, tokenizer=tok)

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        if len(images) > 1:
            raise ValueError("FuyuProcessor takes one image per prompt")
        proc = self.reference_processor(model_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "text with no associated image" is the text-only case, on purpose
        try:
            out = proc(images=images[0] if images else None, text=prompt_text(messages), return_tensors="pt",
                       return_legacy_image_output=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values")}

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        with torch.no_grad():
            embeds = model.model.language_model.embed_tokens(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                pv = inputs["pixel_values"]
                feats = model.model.vision_embed_tokens(pv)
                ref["pixel_values"] = [pv.numpy()]
                ref["vision_encoder"] = [feats.numpy()]
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, feats)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        """preprocess and vision_encoder per image (Fuyu has no projector), embed_tokens, the decoder on the
        reference's merged embeddings."""
        from ...runtime.pipeline import KVCache
        from ...verify import compare, component_tol

        fam = pipe.family
        out = []
        for i, img in enumerate(prep.images):
            tag = f"{case}[{i}]"
            out.append(compare(tag, "preprocess", img.pixel_values, ref["pixel_values"][i], 1e-5, 0.999999))
            feed = {"pixel_values": np.ascontiguousarray(ref["pixel_values"][i], dtype=np.float32)}
            got = pipe.runners["vision_encoder"].infer(feed)["image_embeds"]
            out.append(compare(tag, "vision_encoder", got, ref["vision_encoder"][i], *component_tol(tol_for("vision_encoder"))))
        out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
        logits = pipe.decoder_step(np.ascontiguousarray(ref["decoder_inputs_embeds"], dtype=np.float32), fam.prefill_feeds(prep, None),
                                   KVCache(pipe.specs["decoder"]))
        t = tol_for("decoder")
        out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
        return out

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_embed_tokens}
