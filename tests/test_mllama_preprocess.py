"""mmexport.families.mllama.image against transformers' mllama code (the real thing, no mocks, no Hub).

Images: `MllamaImageProcessorPil` -- pixel_values within 1e-5 (in practice bit-identical), aspect_ratio_ids,
aspect_ratio_mask and num_tiles exactly, for tiny / huge / wide / tall / square / odd sizes, non-RGB modes, the
released checkpoints' config (560 px tiles, 4 tiles, CLIP mean/std, bilinear) and small tile configs like the tiny
test model's. Random-noise content makes any interpolation or padding difference visible.

Text: `processing_mllama.get_cross_attention_token_mask` / `convert_sparse_cross_attention_mask_to_dense`.

Chat template: mmexport/data/mllama_chat_template.jinja rendered by transformers' own renderer.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, without an install
    sys.path.insert(0, str(ROOT))

from mmexport.errors import UserError  # noqa: E402
from mmexport.families.mllama.image import (  # noqa: E402
    MllamaEncodedImage,
    MllamaImageParams,
    cross_attention_token_mask,
    dense_cross_attention_mask,
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
    preprocess_mllama,
    supported_aspect_ratios,
)

pil_mllama = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")
processing_mllama = pytest.importorskip("transformers.models.mllama.processing_mllama")
MllamaImageProcessorPil = pil_mllama.MllamaImageProcessorPil

TOL = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = 128256  # <|image|>
BOS = 128000  # <|begin_of_text|>

# meta-llama/Llama-3.2-11B-Vision-Instruct's preprocessor_config.json (as saved by transformers at release).
REAL_CONFIG = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": CLIP_MEAN, "image_processor_type": "MllamaImageProcessor", "image_std": CLIP_STD,
    "max_image_tiles": 4, "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}

# name -> processor kwargs (a preprocessor_config.json subset); both sides are built from the same dict.
CONFIGS = {
    "real_560x4": REAL_CONFIG,
    "tiny_28x4": {**REAL_CONFIG, "size": {"height": 28, "width": 28}},  # the tiny test model's geometry
    "tiny_56x4_defaults": {"size": {"height": 56, "width": 56}},  # class defaults otherwise (mean/std 0.5)
    "t32x2_bicubic": {**REAL_CONFIG, "size": {"height": 32, "width": 32}, "max_image_tiles": 2, "resample": 3},
    "t20x6_nearest": {"size": {"height": 20, "width": 20}, "max_image_tiles": 6, "resample": 0},
    "t14x8_lanczos": {**REAL_CONFIG, "size": {"height": 14, "width": 14}, "max_image_tiles": 8, "resample": 1},
    "t40x1": {**REAL_CONFIG, "size": {"height": 40, "width": 40}, "max_image_tiles": 1},
}

MAX_DIFFS: dict[str, float] = {}


@functools.lru_cache(maxsize=None)
def hf_processor(config: str):
    return MllamaImageProcessorPil(**json.loads(json.dumps(CONFIGS[config])))


@functools.lru_cache(maxsize=None)
def ours_params(config: str) -> MllamaImageParams:
    return MllamaImageParams.from_preprocessor_config(CONFIGS[config])


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000 * width + height)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    if mode == "RGB":
        return Image.fromarray(noise(width, height, 3, seed), "RGB")
    if mode == "RGBA":
        return Image.fromarray(noise(width, height, 4, seed), "RGBA")
    if mode == "LA":
        return Image.fromarray(noise(width, height, 4, seed)).convert("LA")
    if mode == "L":
        return Image.fromarray(noise(width, height, 1, seed), "L")
    if mode == "1":
        return Image.fromarray(noise(width, height, 1, seed), "L").convert("1")
    if mode == "CMYK":
        return Image.fromarray(noise(width, height, 4, seed), "CMYK")
    if mode == "I;16":
        im = Image.fromarray(noise(width, height, 1, seed).astype("<u2") * 257)
        assert im.mode == "I;16", im.mode
        return im
    if mode in ("P", "P_transparent"):
        rng = np.random.default_rng(seed + 7)
        im = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), "P")
        im.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
        if mode == "P_transparent":
            im.info["transparency"] = 3  # palette index 3 is transparent -> composited onto white
        return im
    raise ValueError(mode)


def compare(image: Image.Image, hf, params: MllamaImageParams, label: str) -> MllamaEncodedImage:
    ref = hf(images=image)
    ours = preprocess_mllama(image, params)
    max_tiles = params.max_image_tiles
    ref_pixels = np.asarray(ref["pixel_values"])
    assert ref_pixels.shape[:3] == (1, 1, max_tiles)
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_pixels.shape[2:], (label, ours.pixel_values.shape, ref_pixels.shape)
    assert ours.aspect_ratio_id == int(np.asarray(ref["aspect_ratio_ids"])[0, 0]), label
    assert ours.aspect_ratio_mask.dtype == np.int64
    assert np.array_equal(ours.aspect_ratio_mask, np.asarray(ref["aspect_ratio_mask"])[0, 0]), label
    assert ours.num_tiles == ref["num_tiles"][0][0], label
    diff = float(np.max(np.abs(ours.pixel_values.astype(np.float64) - ref_pixels[0, 0].astype(np.float64))))
    MAX_DIFFS[label] = diff
    assert diff <= TOL, f"{label}: max abs diff {diff}"
    return ours


# (width, height): tiny, odd, exactly one tile, one pixel over, wide / tall up to 80:1, huge.
SIZES = [
    (1, 1), (2, 3), (7, 5), (13, 200), (200, 13), (27, 28), (28, 28), (29, 28), (55, 57), (56, 56), (100, 100),
    (333, 517), (517, 333), (560, 560), (561, 560), (560, 561), (640, 480), (480, 640), (1000, 1), (1, 1000),
    (1119, 1121), (1120, 1120), (1680, 560), (2240, 560), (560, 2240), (2000, 300), (4000, 50), (50, 4000),
    (3000, 2999),
]
SIZE_CONFIGS = ["real_560x4", "tiny_28x4", "tiny_56x4_defaults"]


@pytest.mark.parametrize("config", SIZE_CONFIGS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rgb_noise_matches_transformers(size, config):
    width, height = size
    label = f"RGB {width}x{height} {config}"
    compare(make_image("RGB", width, height), hf_processor(config), ours_params(config), label)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in SIZE_CONFIGS])
def test_other_tile_configs_match_transformers(config):
    for width, height in [(1, 1), (13, 200), (200, 13), (57, 31), (97, 161), (300, 41), (640, 480)]:
        compare(make_image("RGB", width, height, seed=2), hf_processor(config), ours_params(config),
                f"RGB {width}x{height} {config}")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "P_transparent", "CMYK", "I;16"])
def test_non_rgb_modes_match_transformers(mode):
    for width, height in [(123, 77), (64, 201)]:
        image = make_image(mode, width, height, seed=3)
        for config in ("real_560x4", "tiny_28x4"):
            compare(image, hf_processor(config), ours_params(config), f"{mode} {width}x{height} {config}")


@pytest.mark.parametrize(
    "mode,flags",
    [
        ("RGB", dict(do_rescale=False)),
        ("RGB", dict(do_normalize=False)),
        ("RGB", dict(do_rescale=False, do_normalize=False)),
        ("RGB", dict(do_convert_rgb=False, rescale_factor=1 / 127.5)),
        ("RGBA", dict(do_convert_rgb=False, do_normalize=False)),  # 4 channels all the way through
        ("L", dict(do_convert_rgb=False, do_normalize=False)),  # 1 channel
        ("RGB", dict(resample=4)),  # BOX
        ("RGB", dict(resample=5)),  # HAMMING
        ("RGB", dict(image_mean=0.25, image_std=0.75)),  # scalar mean / std
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]:.3g}" for k in v),
)
def test_processing_flags_match_transformers(mode, flags):
    cfg = {**CONFIGS["tiny_28x4"], **flags}
    hf = MllamaImageProcessorPil(**cfg)
    params = MllamaImageParams.from_preprocessor_config(cfg)
    for width, height in [(123, 77), (20, 90)]:
        compare(make_image(mode, width, height, seed=6), hf, params, f"{mode} {width}x{height} flags {flags}")


def test_padding_and_tile_layout():
    """A 1x2-tile image: row-major tiles, bottom/right padding is the normalized 0 (not 0), unused tiles are 0."""
    params = ours_params("tiny_28x4")
    image = make_image("RGB", 50, 20, seed=1)
    # Canvas 1x2 tiles (28x56; ties with 2x2 at scale 1.12, the smaller area wins). The fit keeps 20x50: only the
    # side with the smaller scale (width, 50 -> 50) sets the size, so the image is not stretched to the canvas.
    assert get_optimal_tiled_canvas(20, 50, 4, 28) == (28, 56)
    assert get_image_size_fit_to_canvas(20, 50, 28, 56, 28) == (20, 50)
    enc = preprocess_mllama(image, params)
    assert enc.aspect_ratio == (1, 2) and enc.num_tiles == 2
    assert enc.aspect_ratio_id == supported_aspect_ratios(4).index((1, 2)) + 1 == 2
    assert enc.aspect_ratio_mask.tolist() == [1, 1, 0, 0]
    assert not enc.pixel_values[2:].any()
    mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
    pad = (np.float32(0) - mean) / std  # padding happens on the uint8 image, before rescale / normalize
    assert np.array_equal(enc.pixel_values[0, :, 20:, :], np.broadcast_to(pad, (3, 8, 28)))
    assert np.array_equal(enc.pixel_values[1, :, 20:, :], np.broadcast_to(pad, (3, 8, 28)))
    assert np.array_equal(enc.pixel_values[1, :, :, 22:], np.broadcast_to(pad, (3, 28, 6)))
    resized = np.asarray(image.resize((50, 20), resample=Image.Resampling.BILINEAR)).astype(np.float64) / 255
    normed = ((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(enc.pixel_values[0, :, :20, :], normed[:, :, :28], atol=1e-5)
    np.testing.assert_allclose(enc.pixel_values[1, :, :20, :22], normed[:, :, 28:], atol=1e-5)


def test_canvas_and_fit_equal_transformers_exhaustively():
    """The size arithmetic (float64 scales, ties by area, floor / `or 1`) over many sizes and tile configs."""
    cases = 0
    dims = list(range(1, 90)) + [111, 139, 200, 279, 280, 281, 333, 559, 560, 561, 839, 1119, 1120, 1121, 1679,
                                 1680, 2239, 2240, 2241, 4000, 9999]
    for tile, max_tiles in [(560, 4), (28, 4), (56, 4), (14, 8), (20, 6), (40, 1), (32, 2), (10, 16)]:
        for h in dims:
            for w in dims[::7] + [1, 2, 3, 4000]:
                canvas = pil_mllama.get_optimal_tiled_canvas(h, w, max_tiles, tile)
                ours = get_optimal_tiled_canvas(h, w, max_tiles, tile)
                assert ours == tuple(int(v) for v in canvas), (h, w, tile, max_tiles)
                fit = pil_mllama.get_image_size_fit_to_canvas(h, w, ours[0], ours[1], tile)
                assert get_image_size_fit_to_canvas(h, w, ours[0], ours[1], tile) == tuple(int(v) for v in fit)
                cases += 1
    assert cases > 10000
    for max_tiles in (1, 2, 4, 6, 8, 16):
        assert supported_aspect_ratios(max_tiles) == pil_mllama.get_all_supported_aspect_ratios(max_tiles)


def test_every_aspect_ratio_id_is_reachable():
    """Tall / wide / square images land on all 8 grids of max_image_tiles=4; ids and masks as in transformers."""
    params, hf = ours_params("tiny_28x4"), hf_processor("tiny_28x4")
    seen = set()
    for rows, cols in supported_aspect_ratios(4):
        image = make_image("RGB", 28 * cols, 28 * rows, seed=rows * 10 + cols)  # exactly the grid: no resampling
        enc = compare(image, hf, params, f"grid {rows}x{cols}")
        assert enc.aspect_ratio == (rows, cols) and enc.num_tiles == rows * cols
        seen.add(enc.aspect_ratio_id)
    assert seen == set(range(1, 9))


# ---------------------------------------------------------------------------------------------- params


def test_real_config_params_and_defaults():
    params = MllamaImageParams.from_preprocessor_config(REAL_CONFIG)
    hf = MllamaImageProcessorPil.from_dict(dict(REAL_CONFIG))
    assert params.tile_size == hf.size.height == hf.size.width == 560
    assert params.size == {"height": 560, "width": 560}
    assert params.max_image_tiles == hf.max_image_tiles == 4
    assert params.image_mean == tuple(hf.image_mean) and params.image_std == tuple(hf.image_std)
    assert params.resample == int(hf.resample) == 2
    assert params.rescale_factor == hf.rescale_factor
    assert params.supported_aspect_ratios == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    compare(make_image("RGB", 800, 600, seed=8), hf, params, "RGB 800x600 real config via from_dict")

    defaults = MllamaImageParams.from_preprocessor_config({})
    hf = MllamaImageProcessorPil()
    assert defaults == MllamaImageParams()
    assert defaults.tile_size == hf.size.height == 224 and defaults.max_image_tiles == hf.max_image_tiles
    assert defaults.image_mean == tuple(hf.image_mean) and defaults.image_std == tuple(hf.image_std)
    assert defaults.resample == int(hf.resample) and defaults.rescale_factor == hf.rescale_factor
    assert (defaults.do_rescale, defaults.do_normalize, defaults.do_convert_rgb) == (
        hf.do_rescale, hf.do_normalize, hf.do_convert_rgb)
    assert MllamaImageParams.from_preprocessor_config({"size": 56}).tile_size == 56


@pytest.mark.parametrize(
    "bad",
    [{"do_pad": False}, {"do_resize": False}, {"max_image_tiles": 0}, {"size": {"height": 56, "width": 28}},
     {"size": {"shortest_edge": 56}}],
    ids=lambda d: next(iter(d)),
)
def test_unsupported_configs_are_refused_like_transformers(bad):
    with pytest.raises(ValueError):
        MllamaImageProcessorPil(**{**CONFIGS["tiny_28x4"], **bad})
    with pytest.raises(UserError):
        MllamaImageParams.from_preprocessor_config({**CONFIGS["tiny_28x4"], **bad})


def test_params_dict_roundtrip():
    for config in CONFIGS:
        params = ours_params(config)
        d = json.loads(json.dumps(params.to_dict()))
        assert MllamaImageParams.from_dict(d) == params
    with pytest.raises(UserError, match="tile_size"):
        MllamaImageParams.from_dict({"max_image_tiles": 4, "image_mean": CLIP_MEAN, "image_std": CLIP_STD})


def test_channel_mismatch_is_a_user_error():
    image = make_image("L", 40, 30)
    cfg = {**CONFIGS["tiny_28x4"], "do_convert_rgb": False}
    with pytest.raises(ValueError):
        MllamaImageProcessorPil(**cfg)(images=image)
    with pytest.raises(UserError, match="channels"):
        preprocess_mllama(image, MllamaImageParams.from_preprocessor_config(cfg))
    with pytest.raises(TypeError):
        preprocess_mllama(np.zeros((4, 4, 3), np.uint8), ours_params("tiny_28x4"))


# ---------------------------------------------------------------------------------------------- cross-attention


CROSS_CASES = {
    "no_image": [BOS, 10, 11, 12],
    "single_first": [IMAGE_TOKEN, 10, 11, 12],
    "single_not_first": [BOS, 128006, 882, 128007, 271, IMAGE_TOKEN, 5, 6, 128009],
    "single_last": [BOS, 5, 6, IMAGE_TOKEN],
    "two_separated": [BOS, IMAGE_TOKEN, 5, 6, IMAGE_TOKEN, 7, 8],
    "two_consecutive": [IMAGE_TOKEN, IMAGE_TOKEN, BOS, 5, 6],
    "consecutive_then_one": [BOS, IMAGE_TOKEN, IMAGE_TOKEN, 4, IMAGE_TOKEN, 5],
    "three_consecutive_middle": [BOS, 3, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8],
    "one_then_consecutive_at_end": [BOS, IMAGE_TOKEN, 4, 5, IMAGE_TOKEN, IMAGE_TOKEN],
    "only_images": [IMAGE_TOKEN, IMAGE_TOKEN],
    "empty": [],
}


@pytest.mark.parametrize("name", list(CROSS_CASES))
def test_cross_attention_masks_match_transformers(name):
    ids = CROSS_CASES[name]
    ref = processing_mllama.get_cross_attention_token_mask(list(ids), IMAGE_TOKEN)
    ours = cross_attention_token_mask(ids, IMAGE_TOKEN)
    assert ours == ref
    assert cross_attention_token_mask(np.asarray(ids, dtype=np.int64), IMAGE_TOKEN) == ref
    if not ids:
        return
    num_tiles = [(3 * i) % 4 + 1 for i in range(len(ref))]
    for max_tiles in (4, 6):
        for length in (len(ids), len(ids) + 3, max(1, len(ids) - 2)):  # exact, right-padded batch, truncated
            dense_ref = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
                [ref], [num_tiles], max_tiles, length)
            dense = dense_cross_attention_mask(ours, num_tiles, max_tiles, length)
            assert dense.dtype == np.int64
            assert dense.shape == (length, len(ref), max_tiles)
            assert np.array_equal(dense[None], dense_ref), (name, max_tiles, length)


def test_cross_attention_random_sequences_match_transformers():
    rng = np.random.default_rng(0)
    for trial in range(300):
        length = int(rng.integers(1, 40))
        ids = np.where(rng.random(length) < 0.25, IMAGE_TOKEN, rng.integers(0, 128000, length)).tolist()
        ref = processing_mllama.get_cross_attention_token_mask(ids, IMAGE_TOKEN)
        ours = cross_attention_token_mask(ids, IMAGE_TOKEN)
        assert ours == ref, ids
        # Fewer num_tiles entries than images is allowed (zip); those images stay masked out.
        num_tiles = rng.integers(1, 5, size=max(0, len(ref) - int(trial % 3 == 0))).tolist()
        total = length + int(rng.integers(0, 4))
        dense_ref = processing_mllama.convert_sparse_cross_attention_mask_to_dense([ref], [num_tiles], 4, total)
        assert np.array_equal(dense_cross_attention_mask(ours, num_tiles, 4, total)[None], dense_ref), ids


# ---------------------------------------------------------------------------------------------- chat template


def _template() -> str:
    return (importlib.resources.files("mmexport") / "data" / "mllama_chat_template.jinja").read_text(encoding="utf-8")


def test_chat_template_renders_like_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = _template()
    assert template.startswith("{{- bos_token }}\n") and template.endswith("{%- endif %}\n")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe the image.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert rendered == [expected]

    # The renderer settings transformers uses (sandboxed, trim_blocks + lstrip_blocks), as the runtime does.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="<|begin_of_text|>") == expected

    # Text only: the Llama 3.1 system header with the knowledge cutoff and today's date.
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    rendered, _ = render_jinja_template([text_only], chat_template=template, add_generation_prompt=True,
                                        bos_token="<|begin_of_text|>", date_string="26 Jul 2024")
    assert rendered == [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ]


# ---------------------------------------------------------------------------------------------- torch-free


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import numpy as np; from PIL import Image; "
        "from mmexport.families.mllama.image import MllamaImageParams, preprocess_mllama, "
        "cross_attention_token_mask, dense_cross_attention_mask; "
        "p = MllamaImageParams(tile_size=28, max_image_tiles=4); "
        "e = preprocess_mllama(Image.new('RGB', (50, 20)), p); "
        "m = dense_cross_attention_mask(cross_attention_token_mask([1, 9, 2], 9), [e.num_tiles], 4, 3); "
        "assert e.pixel_values.shape == (4, 3, 28, 28) and m.shape == (3, 1, 4), (e.pixel_values.shape, m.shape); "
        "bad = [k for k, v in sys.modules.items() if k.split('.')[0] in ('torch', 'transformers') and v is not None]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
