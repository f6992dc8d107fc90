"""Llama 3.2 Vision's PyTorch references for verify, taskeval and bench (transformers' MllamaProcessor with
its PIL image processor, and the model; torch imported when used)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class MllamaReference:
    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """MllamaProcessor's output for the chat-rendered prompt (tokenizer + PIL image processor)."""
        from transformers import AutoTokenizer, MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        proc = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(model_dir, local_files_only=True), tokenizer=tok)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template already starts with <|begin_of_text|>; the processor must not add another
        return dict(proc(images=[list(images)] if images else None, text=text, return_tensors="pt", add_special_tokens=False))

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        lm = model.model.language_model
        cross = list(lm.cross_attention_layers)
        with torch.no_grad():
            ref["embed_tokens"] = lm.embed_tokens(ids).numpy()
            out = model(**inputs, use_cache=True)
            ref["logits"] = out.logits[0, -1].numpy()
            if "pixel_values" in inputs:
                pv, ar_ids, ar_mask = inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
                n = pv.shape[1]
                ref["pixel_values"] = [pv[0, i].numpy() for i in range(n)]
                ref["aspect_ratio_ids"] = ar_ids[0].numpy()
                ref["aspect_ratio_mask"] = ar_mask[0].numpy()
                feats = model.model.vision_model(pixel_values=pv, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask).last_hidden_state
                ref["vision_encoder"] = [feats[0, i].numpy() for i in range(n)]
                states = model.model.multi_modal_projector(feats)  # [1, n, T, P, hidden]
                ref["projector"] = [states[0, i].numpy() for i in range(n)]
                ref["cross_states"] = states[0].reshape(-1, states.shape[-2], states.shape[-1]).numpy()
                ref["cross_attention_mask"] = inputs["cross_attention_mask"][0].numpy()  # [S, n, T]
                # the cross K/V transformers itself cached in each cross-attention layer during that forward
                P = states.shape[-2]
                for j in cross:
                    layer = out.past_key_values.layers[j]
                    kvh, _, d = layer.keys.shape[1:]
                    ref[f"cross_key_{j}"] = layer.keys.reshape(1, kvh, -1, P, d).numpy()
                    ref[f"cross_value_{j}"] = layer.values.reshape(1, kvh, -1, P, d).numpy()
        return ref

    def verify_components(self, pipe, prep, ref: dict[str, Any], case: str, tol_for) -> list:
        """Each exported component on the reference's own inputs, so errors do not compound."""
        import numpy as np

        from ...runtime.methods import CrossState
        from ...runtime.pipeline import KVCache
        from ...verify import Check, compare, component_tol

        out = []
        for i, img in enumerate(prep.images):
            tag = f"{case}[{i}]"
            out.append(compare(tag, "preprocess", img.pixel_values, ref["pixel_values"][i], 1e-5, 0.999999))
            same = img.aspect_ratio_id == int(ref["aspect_ratio_ids"][i]) and np.array_equal(img.aspect_ratio_mask, ref["aspect_ratio_mask"][i])
            out.append(Check(tag, "tiles", same, f"aspect ratio id {img.aspect_ratio_id}, {img.num_tiles} tile(s): "
                             + ("identical to transformers" if same else f"transformers: id {int(ref['aspect_ratio_ids'][i])}")))
            feats = pipe.runners["vision_encoder"].infer(pipe.family.vision_feeds(img))["vision_hidden"]
            out.append(compare(tag, "vision_encoder", feats, ref["vision_encoder"][i], *component_tol(tol_for("vision_encoder"))))
            states = pipe.runners["projector"].infer({"vision_hidden": ref["vision_encoder"][i].astype(np.float32)})["image_states"]
            out.append(compare(tag, "projector", states, ref["projector"][i], *component_tol(tol_for("projector"))))
        out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
        if prep.images:
            kv = pipe.runners["cross_kv"].infer({"cross_states": ref["cross_states"].astype(np.float32)})
            for name in sorted(kv):
                out.append(compare(case, f"cross_kv {name}", kv[name], ref[name], *component_tol(tol_for("cross_kv"))))
            ours_mask = pipe.family._mask(prep, CrossState({}, ref["cross_states"].shape[0], True))
            same = np.array_equal(ours_mask, ref["cross_attention_mask"].reshape(len(prep.input_ids), -1))
            out.append(Check(case, "cross-attention mask", same, "identical to transformers" if same else "differs from transformers"))
            state = CrossState({k: ref[k].astype(np.float32) for k in kv}, ref["cross_states"].shape[0], True)
        else:
            state = pipe.encode_images([])
        logits = pipe.decoder_step(ref["embed_tokens"].astype(np.float32), pipe.family.prefill_feeds(prep, state), KVCache(pipe.specs["decoder"]))
        t = tol_for("decoder")
        out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
        return out

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_model, "projector": model.model.multi_modal_projector}
