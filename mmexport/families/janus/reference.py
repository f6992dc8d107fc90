"""Janus's PyTorch references for verify, taskeval and bench: transformers' JanusProcessor (with the PIL image
processor) and JanusForConditionalGeneration in its text-generation mode; torch imported when used."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checks import method_a_checks


class JanusReference:
    def reference_processor(self, model_dir: Path):
        """JanusProcessor as the checkpoint saves it, with transformers' PIL image processor (JanusImageProcessorPil)."""
        from transformers import AutoTokenizer, JanusProcessor
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        ip = JanusImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return JanusProcessor.from_pretrained(model_dir, image_processor=ip, tokenizer=tok, local_files_only=True)

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """JanusProcessor's output (generation_mode "text": the understanding path) for the chat-rendered prompt."""
        proc = self.reference_processor(model_dir)
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = proc(text=text, images=list(images) or None, generation_mode="text", return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in out}

    def reference_generate(self, model, inputs: dict[str, Any], n: int) -> list[int]:
        """transformers' greedy generate in Janus's text mode (generation_mode="text", the default: guidance off,
        the LM head, not the image-generation head)."""
        import torch

        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, generation_mode="text")
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ref: dict[str, Any] = {"input_ids": inputs["input_ids"][0].numpy()}
        with torch.no_grad():
            ids = inputs["input_ids"]
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                pv = inputs["pixel_values"]
                feats = model.model.get_image_features(pv)
                ref["pixel_values"] = [p.numpy() for p in pv]
                ref["vision_encoder"] = [h[None].numpy() for h in feats.last_hidden_state]
                ref["projector"] = [e.numpy() for e in feats.pooler_output]
                image_embeds = feats.pooler_output.reshape(-1, embeds.shape[-1])
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, image_embeds)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_model, "projector": model.model.aligner}
