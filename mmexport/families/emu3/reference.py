"""Emu3's PyTorch references for verify, taskeval and bench: transformers' Emu3Processor (its numpy/PIL
Emu3ImageProcessor, the tokenizer, the chat template) and Emu3ForConditionalGeneration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# fp16 may move a latent that lies almost halfway between two codebook entries to the other one: verify counts
# the codes that differ from transformers' and passes while they are at most this share of an image's codes
# (fp32: none may differ)
FP16_MAX_FLIPPED_CODES = 0.02


class Emu3Reference:
    def reference_processor(self, model_dir: Path):
        from transformers import AutoTokenizer, Emu3ImageProcessor, Emu3Processor

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return Emu3Processor(image_processor=Emu3ImageProcessor.from_pretrained(model_dir, local_files_only=True), tokenizer=tok)

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        template = tok.chat_template or self.default_chat_template
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        proc = self.reference_processor(model_dir)
        out = proc(images=list(images) if images else None, text=text, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        m = model.model
        with torch.no_grad():
            embeds = m.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                ref.update(pixel_values=[], vq_input=[], latents=[], codes=[], image_token_ids=[])
                f = m.vqmodel.vision_spatial_factor
                for pv, size in zip(inputs["pixel_values"], inputs["image_sizes"]):
                    h, w = int(size[0]), int(size[1])
                    pv = pv[None]  # one image, zero-padded to the prompt's largest as the processor batches them
                    enc = m.vqmodel.encoder(pv.unsqueeze(1).repeat(1, m.vqmodel.config.temporal_downsample_factor, 1, 1, 1))
                    lat = m.vqmodel.quant_conv(enc.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
                    codes = m.vqmodel.quantize(lat)[0, 0]
                    ref["pixel_values"].append(pv[0, :, :h, :w].numpy())
                    ref["vq_input"].append(pv.numpy())
                    ref["latents"].append(lat[0, 0].permute(1, 2, 0).reshape(-1, lat.shape[2]).numpy())
                    ref["codes"].append(codes[: h // f, : w // f].reshape(-1).numpy())
                    ref["image_token_ids"].append(m.get_image_tokens(pv, torch.tensor([[h, w]])).numpy())
                feats = torch.cat(m.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)
                mask = (ids == m.vocabulary_mapping.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, feats)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        """Per image (on the reference's VQ input: the image zero-padded to the prompt's largest, as transformers
        batches them): preprocessing, the VQ latents, the codes (how many differ from transformers': none at fp32,
        at most FP16_MAX_FLIPPED_CODES of them at fp16) and their token ids (from the reference's codes: exact);
        then embed_tokens and the decoder on the reference's merged embeddings."""
        from ...runtime.pipeline import KVCache
        from ...verify import Check, compare, component_tol

        fam = pipe.family
        out: list = []
        fp16 = pipe.manifest.data["precision"] != "fp32"
        for i, img in enumerate(prep.images):
            tag = f"{case}[{i}]"
            out.append(compare(tag, "preprocess", img.pixel_values, ref["pixel_values"][i], 1e-5, 0.999999))
            feed = {"pixel_values": np.ascontiguousarray(ref["vq_input"][i], dtype=np.float32)}
            got = pipe.runners["vision_encoder"].infer(feed)
            got["codes"] = fam.image_codes(img, tuple(ref["vq_input"][i].shape[2:]), got["codes"])
            out.append(compare(tag, "vision_encoder latents", got["latents"], ref["latents"][i], *component_tol(tol_for("vision_encoder"))))
            want = ref["codes"][i]
            flipped = int(np.count_nonzero(got["codes"] != want)) if got["codes"].shape == want.shape else int(want.size)
            bound = int(FP16_MAX_FLIPPED_CODES * want.size) if fp16 else 0
            out.append(Check(tag, "vision_encoder codes", flipped <= bound,
                             f"{flipped} of {want.size} codes differ from transformers (allowed {bound})",
                             {"flipped": flipped, "codes": int(want.size), "allowed": bound}))
            ids = fam.image_token_ids(img, want.astype(np.int64))
            same = np.array_equal(ids, ref["image_token_ids"][i])
            out.append(Check(tag, "image token ids", same, "identical to transformers' get_image_tokens" if same else "differ"))
        out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
        logits = pipe.decoder_step(np.ascontiguousarray(ref["decoder_inputs_embeds"], dtype=np.float32), fam.prefill_feeds(prep, None),
                                   KVCache(pipe.specs["decoder"]))
        t = tol_for("decoder")
        out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
        return out

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vqmodel}
