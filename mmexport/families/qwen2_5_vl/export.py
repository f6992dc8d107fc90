"""Qwen2.5-VL (Method A), export side: Qwen2-VL's adapter (families/qwen2_vl: synthetic checkpoints,
preprocessing, projector, embedding, the generic M-RoPE decoder, runtime config and the transformers
reference) with Qwen2.5-VL's vision tower. Every size is read from the config (3B/7B/32B/72B differ only in
size).

  vision_encoder  patch embedding + RMSNorm/SwiGLU blocks, one image per call, patches in window order
                  (runtime.py): blocks in `fullatt_block_indexes` attend over all the image's patches, the
                  others are one batched attention over [num_windows, window_patches] with padded keys
                  masked; output in window order, as transformers' `last_hidden_state`.
  projector       Qwen2_5_VLPatchMerger (RMSNorm, 2x2 merge, MLP) on the window-ordered patches; the runtime
                  puts its tokens back into raster order (transformers' `reverse_indices`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ...spec import ComponentSpec, Dim, TensorSpec
from ..base import ExportComponent
from ..qwen2_vl.export import (CHAT_TEMPLATE, SPECIAL_TOKENS as QWEN2_VL_SPECIAL_TOKENS, Qwen2VLAdapter, _example_grid, _vision_theta,
                               attend, full_attention, vision_encoder_module)
from .runtime import count_windows, window_feeds

# Qwen2.5's tokenizer: Qwen2-VL's special tokens, then tool-call and fill-in-the-middle tokens (ids 151657-151664)
SPECIAL_TOKENS = [*QWEN2_VL_SPECIAL_TOKENS, "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                  "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# Max aspect ratio of a resized grid: the processor refuses images beyond 200:1, and smart_resize's rounding
# (round, or floor when scaling down) can at most double that for a one-unit side.
_MAX_GRID_RATIO = 400


def max_windows(max_units: int, window: int) -> int:
    """The most windows an image of at most `max_units` merge units can take (long thin grids take the most)."""
    best = 1
    for lh in range(1, max_units + 1):
        lw = min(max_units // lh, _MAX_GRID_RATIO * lh)
        if lw < lh:
            break
        best = max(best, -(-lh // window) * -(-lw // window))
    return best


def window_attention(full_blocks: Sequence[int]):
    """Qwen2.5-VL's per-block attention for qwen2_vl's vision_encoder_module: full attention over the image in
    `full_blocks`, else each window alone, as one batched attention over [num_windows, window_patches] rows
    gathered by `window_index` (padding slots masked as keys with a finite bias: never -inf, so no row can
    become NaN) and scattered back by `patch_slots` (a gather too: no data-dependent shapes)."""
    import torch

    full = frozenset(int(i) for i in full_blocks)
    neg = torch.finfo(torch.float32).min

    def attention(block: int, q, k, v, scaling: float, window_index, patch_slots):  # q, k, v [P, H, D]
        if block in full:
            return full_attention(block, q, k, v, scaling)
        windows, slots = window_index.shape
        rows = window_index.clamp(min=0).reshape(-1)
        pad = torch.where(window_index >= 0, 0.0, neg).view(windows, 1, 1, slots)
        qw, kw, vw = (t.index_select(0, rows).view(windows, slots, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = attend(qw, kw, vw, scaling, pad).transpose(1, 2)  # [W, S, H, D]
        return o.reshape(windows * slots, *q.shape[1:]).index_select(0, patch_slots)

    return attention


class Qwen25VLAdapter(Qwen2VLAdapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    config_class = "Qwen2_5_VLConfig"
    special_tokens = SPECIAL_TOKENS
    # Qwen2.5-VL-*-Instruct ship Qwen2-VL's chat_template.json, character for character (the test checks the
    # published digest), so it is imported rather than repeated
    chat_template = CHAT_TEMPLATE

    vision_width = "hidden_size"
    patch_order = "window order"

    def _sizes(self, model) -> dict[str, int]:
        vc = model.config.vision_config
        return {**super()._sizes(model), "window": vc.window_size // vc.spatial_merge_size // vc.patch_size}

    def _vision_specs(self, model, s: dict[str, int], patches: Dim) -> list[ComponentSpec]:
        m2, win = s["merge"] ** 2, s["window"]
        opt_side = max(1, round((patches.opt // m2) ** 0.5))
        most = max_windows(patches.max // m2, win)
        windows = Dim("num_windows", 1, min(most, count_windows(opt_side, opt_side, 1, win)), most)
        base, projector = super()._vision_specs(model, s, patches)
        vision = replace(
            base,
            inputs=(
                *base.inputs,
                TensorSpec("window_index", "int64", ("num_windows", win * win * m2), "row in each window slot, -1 = padding"),
                TensorSpec("patch_slots", "int64", ("num_patches",), "each row's slot in the flattened windows"),
            ),
            dims={**base.dims, "num_windows": windows},
            doc="patch embedding + ViT blocks (windowed and full attention), one image per call",
        )
        return [vision, replace(projector, doc="the checkpoint's PatchMerger: RMSNorm, 2x2 merge, MLP")]

    def example_grid(self, spec: ComponentSpec, s: dict[str, int]) -> tuple[int, int]:
        merge, win = s["merge"], s["window"]
        windows = spec.dims["num_windows"]
        slots = win * win * merge**2

        def several_windows(h: int, w: int) -> bool:  # and a count the tracer cannot confuse with another size
            c = count_windows(h, w, merge, win)
            return 2 <= c <= windows.max and c not in (h * w, slots)

        return _example_grid(spec.dims["num_patches"], merge, several_windows)

    def _vision_components(self, model, specs, s, grid, g) -> list[ExportComponent]:
        import torch

        from ..parts import ModuleCall

        gh, gw = grid
        pixels = torch.randn(gh * gw, s["patch_dim"], generator=g).numpy()
        feeds = window_feeds(pixels, gh, gw, s["merge"], s["window"], s["v_head_dim"], _vision_theta(model.config.vision_config))
        example = {name: torch.from_numpy(np.array(a)) for name, a in feeds.items()}  # copies: the layout is read-only
        visual = model.model.visual
        encoder = vision_encoder_module(visual, window_attention(visual.fullatt_block_indexes)).eval()
        return [
            ExportComponent(specs["vision_encoder"], encoder, example),
            ExportComponent(specs["projector"], ModuleCall(visual.merger).eval(), {"vision_hidden": torch.randn(gh * gw, s["embed_dim"], generator=g)}),
        ]

    def runtime_config(self, model, model_dir, recipe) -> dict[str, Any]:
        cfg = super().runtime_config(model, model_dir, recipe)
        vc = model.config.vision_config
        cfg["vision"].update(window_size=vc.window_size, patch_size=vc.patch_size)
        return cfg
