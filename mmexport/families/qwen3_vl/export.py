"""Qwen3-VL (Method A with deepstack), export side. Qwen2-VL's adapter with these components:

  vision_encoder  one image: patch embedding (a MatMul) + the learned position embeddings bilinearly resized
                  to the patch grid (the host computes the taps: `pos_indices`/`pos_weights` [P, 4]; the graph
                  gathers and weights) + ViT blocks with host-side 2D rotary tables, full attention within the
                  image -> the last hidden states and the hidden states after each `deepstack_visual_indexes`
                  block, stacked.
  projector       the PatchMerger (LayerNorm, 2x2 merge, MLP) on the last hidden states -> image_embeds, and
                  each deepstack layer's own merger (merge, then LayerNorm) -> deepstack_embeds.
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder (families/decoder.py) with M-RoPE positions (interleaved, as the config
                  says: transformers' own rotary) and q/k-norm (transformers' own layers), plus the declared
                  input deepstack_embeds [n_deep, B, S, hidden], added to the hidden states after decoder
                  layer i < n_deep (a dense add: the runtime puts the features at the image positions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UserError
from ...spec import ComponentSpec, Dim, TensorSpec
from ..base import ExportComponent
from ..qwen2_vl.export import SPECIAL_TOKENS as QWEN2_VL_SPECIAL_TOKENS
from ..qwen2_vl.export import Qwen2VLAdapter, _vision_theta, patch_matrix, vit_block
from ..qwen2_vl.runtime import vision_rotary_tables
from .reference import Qwen3VLReference
from .runtime import position_embedding_taps

# Qwen3-VL's added tokens: Qwen2-VL's, then Qwen3's tool / fill-in-the-middle / thinking tokens (in id order).
SPECIAL_TOKENS = QWEN2_VL_SPECIAL_TOKENS + [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

# The chat template of the Qwen3-VL Instruct checkpoints (chat_template.json of Qwen/Qwen3-VL-2B-Instruct and
# its siblings), verbatim.
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "qwen3_vl_chat_template.jinja"


def deepstack_vision_encoder(visual):
    """pixel_values [P, C*T*p*p], pos_indices/pos_weights [P, 4], rotary cos/sin [P, head_dim] ->
    vision_hidden [P, dim], deepstack_hidden [n_deep, P, dim]."""
    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.blocks = visual.blocks
            self.pos_embed = visual.pos_embed
            self.patch_weight = patch_matrix(visual.patch_embed)
            self.patch_bias = visual.patch_embed.proj.bias
            self.deepstack = list(visual.deepstack_visual_indexes)

        def forward(self, pixel_values, pos_indices, pos_weights, rotary_cos, rotary_sin):
            x = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight.t() + self.patch_bias
            x = x + (self.pos_embed(pos_indices) * pos_weights[:, :, None]).sum(1).to(x.dtype)
            deep = []
            for i, blk in enumerate(self.blocks):
                x = vit_block(blk, x, rotary_cos, rotary_sin)
                if i in self.deepstack:
                    deep.append(x)
            return x, torch.stack(deep)

    return VisionEncoder(visual)


def deepstack_projector(visual):
    """vision_hidden [P, dim], deepstack_hidden [n_deep, P, dim] -> image_embeds [P/4, hidden], deepstack_embeds [n_deep, P/4, hidden]."""
    import torch
    from torch import nn

    class Projector(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.merger = visual.merger
            self.deepstack_mergers = visual.deepstack_merger_list

        def forward(self, vision_hidden, deepstack_hidden):
            deep = [m(deepstack_hidden[j]) for j, m in enumerate(self.deepstack_mergers)]
            return self.merger(vision_hidden), torch.stack(deep)

    return Projector(visual)


def deepstack_decoder(spec: ComponentSpec, text_model, lm_head):
    """The generic decoder; `deepstack_embeds[i]` is added to the output of decoder layer i (i < n_deep)."""
    from ..decoder import StaticCacheDecoder

    class DeepstackDecoder(StaticCacheDecoder):
        def layer_hooks(self, x):
            ds = x["deepstack_embeds"]
            return {i: (lambda h, i=i: h + ds[i].to(h.dtype)) for i in range(ds.shape[0])}

    return DeepstackDecoder(spec, text_model, lm_head)


class Qwen3VLAdapter(Qwen3VLReference, Qwen2VLAdapter):
    model_class = "Qwen3VLForConditionalGeneration"
    config_class = "Qwen3VLConfig"
    special_tokens = SPECIAL_TOKENS
    chat_template = CHAT_TEMPLATE_FILE.read_text()

    vision_width = "hidden_size"

    def _sizes(self, model) -> dict[str, int]:
        return {**super()._sizes(model), "deep": len(model.config.vision_config.deepstack_visual_indexes)}

    def _vision_specs(self, model, s: dict[str, int], patches: Dim) -> list[ComponentSpec]:
        f, n, hidden = "float32", s["deep"], model.config.text_config.hidden_size
        vision = ("num_patches", s["embed_dim"])
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, ("num_patches", s["patch_dim"]), "one image's patches, merge-block order"),
                    TensorSpec("pos_indices", "int64", ("num_patches", 4), "bilinear taps into the learned position table"),
                    TensorSpec("pos_weights", f, ("num_patches", 4), "their weights"),
                    TensorSpec("rotary_cos", f, ("num_patches", s["v_head_dim"]), "2D rotary cos table"),
                    TensorSpec("rotary_sin", f, ("num_patches", s["v_head_dim"]), "2D rotary sin table"),
                ),
                outputs=(TensorSpec("vision_hidden", f, vision),
                         TensorSpec("deepstack_hidden", f, (n, *vision), "after each deepstack_visual_indexes block")),
                dims={"num_patches": patches},
                doc="patch embedding + interpolated position embedding + ViT blocks, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, vision), TensorSpec("deepstack_hidden", f, (n, *vision))),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", hidden)),
                         TensorSpec("deepstack_embeds", f, (n, "num_tokens", hidden))),
                dims={"num_patches": patches},
                doc="PatchMerger on the last hidden states; one deepstack merger per deepstack layer",
            ),
        ]

    def _decoder_spec(self, model, cache) -> ComponentSpec:
        from ..decoder import decoder_spec

        tc = model.config.text_config
        deep = TensorSpec("deepstack_embeds", "float32", (self._sizes(model)["deep"], "batch", "seq_len", tc.hidden_size),
                          "added after decoder layer i; zeros at text positions")
        return decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="mrope", extra_inputs=[deep],
                            doc="Qwen3 decoder (q/k-norm, interleaved M-RoPE) with deepstack over a static KV cache")

    def _vision_components(self, model, specs, s, grid, g) -> list[ExportComponent]:
        import torch

        gh, gw = grid
        n = gh * gw
        visual = model.model.visual
        how = (getattr(visual, "interpolation_mode", "bilinear"), getattr(visual, "interpolation_align_corners", True))
        if how != ("bilinear", True):  # the host-side taps are bilinear with align_corners
            raise UserError(f"position-embedding interpolation {how} is not supported (bilinear, align_corners only)")
        cos, sin = vision_rotary_tables(gh, gw, s["merge"], s["v_head_dim"], _vision_theta(model.config.vision_config))
        idx, w = position_embedding_taps(gh, gw, s["merge"], visual.num_grid_per_side)
        return [
            ExportComponent(specs["vision_encoder"], deepstack_vision_encoder(visual).eval(), {
                "pixel_values": torch.randn(n, s["patch_dim"], generator=g), "pos_indices": torch.from_numpy(idx),
                "pos_weights": torch.from_numpy(w), "rotary_cos": torch.from_numpy(cos), "rotary_sin": torch.from_numpy(sin)}),
            ExportComponent(specs["projector"], deepstack_projector(visual).eval(), {
                "vision_hidden": torch.randn(n, s["embed_dim"], generator=g),
                "deepstack_hidden": torch.randn(s["deep"], n, s["embed_dim"], generator=g)}),
        ]

    def _decoder_module(self, model, spec: ComponentSpec):
        return deepstack_decoder(spec, model.model.language_model, model.lm_head)

    def runtime_config(self, model, model_dir: Path, recipe) -> dict[str, Any]:
        cfg = super().runtime_config(model, model_dir, recipe)
        vc = model.config.vision_config
        cfg["vision"].update(num_grid_per_side=model.model.visual.num_grid_per_side,
                             deepstack_visual_indexes=list(vc.deepstack_visual_indexes))
        cfg["text"]["mrope_interleaved"] = bool(model.config.text_config.rope_parameters.get("mrope_interleaved", False))
        return cfg
