"""verify's per-component checks for Method A families, shared (torch-free: the reference values are numpy).

A Method A family's `reference_outputs` returns, besides `input_ids` and `logits`:
  pixel_values[i]            the reference processor's pixels of image i (compared with our preprocessing)
  vision_encoder[i]          {output name: array} of the vision tower on image i
  projector[i]               {output name: array} of the projector on the reference vision outputs
  embed_tokens               the embedding of the prompt
  decoder_inputs_embeds      the decoder's input (image embeddings merged in)
  decoder_inputs             optional {decoder input name: array} of further reference decoder inputs
Each component then runs on the reference's own inputs (so errors do not compound) and is compared
output by output. A family whose graphs lay outputs out differently from transformers (a window order,
padding) maps them back in its runtime's `vision_outputs_in_reference_order`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _as_dict(value: Any, name: str) -> dict[str, np.ndarray]:
    return value if isinstance(value, dict) else {name: value}


def method_a_checks(pipe, prep, ref: dict[str, Any], case: str, tol_for: Callable[[str], Any]) -> list:
    from ..runtime.pipeline import KVCache
    from ..verify import compare, component_tol

    fam = pipe.family
    vspec, pspec = pipe.specs["vision_encoder"], pipe.specs["projector"]
    out = []
    for i, img in enumerate(prep.images):
        tag = f"{case}[{i}]"
        out.append(compare(tag, "preprocess", fam.reference_pixels(img), ref["pixel_values"][i], 1e-5, 0.999999))
        got = fam.vision_outputs_in_reference_order(img, pipe.runners["vision_encoder"].infer(fam.vision_feeds(img)))
        want = _as_dict(ref["vision_encoder"][i], vspec.output_names[0])
        for name, arr in want.items():
            label = "vision_encoder" if name == vspec.output_names[0] else f"vision_encoder {name}"
            out.append(compare(tag, label, got[name], arr, *component_tol(tol_for("vision_encoder"))))
        feed = {t.name: np.ascontiguousarray(want[t.name], dtype=np.float32) for t in pspec.inputs if t.name in want}
        feed = fam.projector_feeds(img, feed)
        got = fam.projector_outputs_in_reference_order(img, pipe.runners["projector"].infer(feed))
        for name, arr in _as_dict(ref["projector"][i], pspec.output_names[0]).items():
            label = "projector" if name == pspec.output_names[0] else f"projector {name}"
            out.append(compare(tag, label, got[name], arr, *component_tol(tol_for("projector"))))
    out.append(compare(case, "embed_tokens", pipe.embed(prep.input_ids), ref["embed_tokens"], *component_tol(tol_for("embed_tokens"))))
    feeds = fam.prefill_feeds(prep, None)
    feeds.update({k: np.ascontiguousarray(v) for k, v in ref.get("decoder_inputs", {}).items()})
    logits = pipe.decoder_step(np.ascontiguousarray(ref["decoder_inputs_embeds"], dtype=np.float32), feeds, KVCache(pipe.specs["decoder"]))
    t = tol_for("decoder")
    out.append(compare(case, "decoder", logits, ref["logits"], t.logits_max_abs, t.component_min_cosine))
    return out
