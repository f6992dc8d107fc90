"""LLaVA-OneVision's torch-free host side against transformers: LlavaOnevisionImageProcessorPil's pixels (anyres
tiles + base view for a single image, one padded view per image in a multi-image prompt), LlavaOnevisionProcessor's
image-token counts, and LlavaOnevisionModel.pack_image_features (unpadding, the anyres_max bilinear shrink, the
image_newline tokens) as the weighted gather the runtime feeds the projector. Sizes are odd and chosen to land on
different grids; the real checkpoint's preprocessor (384-pixel tiles, 6x6 pinpoints, 729 tokens per view,
anyres_max_9) and a tiny one."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from PIL import Image

from mmexport.families.llava_onevision.image import (
    OnevisionImageParams, image_token_count, pack_tables, preprocess_onevision, select_best_resolution,
)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's preprocessor_config.json (image keys) and processor_config.json
REAL = dict(size={"height": 384, "width": 384}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3,
            image_grid_pinpoints=[[a, b] for a in range(384, 2305, 384) for b in range(384, 2305, 384)])
REAL_PROC = dict(num_image_tokens=729, vision_aspect_ratio="anyres_max_9", side=27)
TINY = dict(size={"height": 28, "width": 28}, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84], [56, 84], [84, 56], [28, 112]])
TINY_PROC = dict(num_image_tokens=4, vision_aspect_ratio="anyres_max_2", side=2)

REAL_SIZES = [(211, 37), (77, 123), (500, 301), (397, 1103), (1201, 763), (641, 1999), (1500, 1901)]  # (h, w)
TINY_SIZES = [(23, 37), (61, 23), (41, 100), (29, 29), (77, 130), (97, 13), (200, 300), (84, 84), (84, 85), (30, 113)]


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    img = Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def _processor(cfg: dict, proc: dict):
    """LlavaOnevisionProcessor with the PIL image processor and a small tokenizer (its video processor needs
    torchvision, absent here: the class check of that slot is skipped; videos are not used)."""
    from transformers import LlavaOnevisionProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from mmexport.synthetic import train_bpe_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], 400),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    with mock.patch.object(LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda self, n, a: None):
        return LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil(**cfg), tokenizer=tok, video_processor=None,
                                       num_image_tokens=proc["num_image_tokens"], vision_feature_select_strategy="full",
                                       vision_aspect_ratio=proc["vision_aspect_ratio"])


CASES = [("real", REAL, REAL_PROC, REAL_SIZES), ("tiny", TINY, TINY_PROC, TINY_SIZES)]


@pytest.mark.parametrize("name,cfg,proc,sizes", CASES, ids=[c[0] for c in CASES])
def test_pixels_equal_transformers_pil_processor(name, cfg, proc, sizes):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    ref = LlavaOnevisionImageProcessorPil(**cfg)
    params = OnevisionImageParams.from_preprocessor_config(cfg)
    grids = set()
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, i, mode=("RGBA", "L", "RGB")[i % 3])
        ours = preprocess_onevision(img, params)
        want = ref(images=[[img]], return_tensors="np")
        assert want["image_sizes"][0].tolist() == list(ours.image_size)
        pv = want["pixel_values"][0]
        assert ours.pixel_values.shape == pv.shape, (h, w)  # one image: no batch padding
        assert np.abs(ours.pixel_values - pv).max() <= 1e-5, (h, w)
        grids.add(ours.grid)
        # the processor's multi-image path: each image one view, padded to a square with the mean colour
        other = _image(w, h, 100 + i)
        both = ref(images=[[img, other]], return_tensors="np")["pixel_values"]
        for k, im in enumerate((img, other)):
            one = preprocess_onevision(im, params, multi_image=True)
            assert one.grid is None and one.pixel_values.shape == (1, *both[k].shape[1:])
            assert np.abs(one.pixel_values - both[k][:1]).max() <= 1e-5, (h, w, k)
    assert len(grids) >= 4, grids  # the sizes cover several grids


@pytest.mark.parametrize("name,cfg,proc,sizes", CASES, ids=[c[0] for c in CASES])
def test_token_counts_equal_processor_and_pack_tables_equal_pack_image_features(name, cfg, proc, sizes):
    """The prompt's image-token count as LlavaOnevisionProcessor expands it, and the packed features (unpad,
    anyres_max shrink, newline per row; base view first) as LlavaOnevisionModel packs them."""
    import torch
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    processor = _processor(cfg, proc)
    params = OnevisionImageParams.from_preprocessor_config(cfg)
    side = proc["side"]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                           image_size=params.tile, patch_size=params.tile // side),
        image_grid_pinpoints=params.grid_pinpoints, vision_aspect_ratio=proc["vision_aspect_ratio"], vision_feature_select_strategy="full")
    holder = type("Holder", (), {})()
    holder.config = config
    g = torch.Generator().manual_seed(0)
    shrunk = 0
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, i)
        out = processor(images=[[img]], text=["<|im_start|>user <image>\nWhat is it?<|im_end|>"], return_tensors="np")
        n_ref = int((out["input_ids"] == processor.image_token_id).sum())
        n = image_token_count((h, w), params, proc["num_image_tokens"], proc["vision_aspect_ratio"], multi_image=False)
        assert n == n_ref, (h, w)
        two = processor(images=[[img, img]], text=["<image><image>hi"], return_tensors="np")
        assert int((two["input_ids"] == processor.image_token_id).sum()) == 2 * image_token_count(
            (h, w), params, proc["num_image_tokens"], proc["vision_aspect_ratio"], multi_image=True)

        for multi in (False, True):
            enc = preprocess_onevision(img, params, multi_image=multi)
            feats = torch.randn(enc.num_views, side * side, 3, generator=g)
            newline = torch.randn(3, generator=g)
            sizes_t = torch.tensor([[h, w]])
            want, _ = LlavaOnevisionModel.pack_image_features(holder, [feats], sizes_t, image_newline=newline,
                                                              vision_aspect_ratio=proc["vision_aspect_ratio"])
            idx, wts = pack_tables(enc, side, proc["vision_aspect_ratio"])
            rows = np.concatenate([feats.reshape(-1, 3).numpy(), newline[None].numpy()])
            got = (rows[idx] * wts[..., None]).sum(1)
            assert got.shape == tuple(want[0].shape)
            assert len(idx) == image_token_count((h, w), params, proc["num_image_tokens"], proc["vision_aspect_ratio"], multi)
            assert np.abs(got - want[0].numpy()).max() <= 1e-5, (h, w, multi)
            shrunk += int(not multi and (wts[:, 1:] != 0).any())
    assert shrunk >= 2  # the anyres_max bilinear shrink is exercised


def test_best_resolution_prefers_effective_pixels_then_least_waste():
    from transformers.image_processing_utils import select_best_resolution as ref

    pins = REAL["image_grid_pinpoints"]
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (200, 2)).tolist():
        assert select_best_resolution((h, w), pins) == tuple(ref((h, w), pins))
