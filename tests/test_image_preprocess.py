"""mmexport.runtime.image against transformers' Qwen2VLImageProcessorPil (the real thing, no mocks).

pixel_values must agree within 1e-5 (max abs diff) and image_grid_thw exactly, for odd sizes, tiny and huge
images, non-RGB modes (RGBA / LA / L / P with and without transparency) and several min/max_pixels settings.
Random-noise content makes any interpolation difference visible.
"""
from __future__ import annotations

import dataclasses
import functools
import io
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
from mmexport.families.qwen2_vl.image import Qwen2VLImageParams, preprocess_image, smart_resize  # noqa: E402
from mmexport.runtime.image import load_image  # noqa: E402

qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
Qwen2VLImageProcessorPil = qwen2_vl_pil.Qwen2VLImageProcessorPil
hf_smart_resize = qwen2_vl_pil.smart_resize

TOL = 1e-5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# name -> (min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size, mean, std)
SETTINGS = {
    "tiny": (3136, 50176, 14, 2, 2, CLIP_MEAN, CLIP_STD),  # the tiny recipe
    "qwen2vl_2b": (3136, 12845056, 14, 2, 2, CLIP_MEAN, CLIP_STD),  # Qwen2-VL-2B-Instruct's config
    "hf_default": (56 * 56, 28 * 28 * 1280, 14, 2, 2, CLIP_MEAN, CLIP_STD),  # processor class defaults
    "p16_m2_t2_half": (4096, 65536, 16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # Qwen3-VL-like geometry
    "p14_m1_t1_big_min": (20000, 40000, 14, 1, 1, CLIP_MEAN, CLIP_STD),  # upscales most inputs
}

MAX_DIFFS: dict[str, float] = {}


def ours_params(setting: str) -> Qwen2VLImageParams:
    mn, mx, p, t, m, mean, std = SETTINGS[setting]
    return Qwen2VLImageParams(
        min_pixels=mn, max_pixels=mx, patch_size=p, temporal_patch_size=t, merge_size=m,
        image_mean=mean, image_std=std,
    )


@functools.lru_cache(maxsize=None)
def hf_processor(setting: str):
    mn, mx, p, t, m, mean, std = SETTINGS[setting]
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": mn, "longest_edge": mx},
        patch_size=p, temporal_patch_size=t, merge_size=m,
        image_mean=list(mean), image_std=list(std),
    )


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
    if mode in ("P", "P_transparent"):
        rng = np.random.default_rng(seed + 7)
        im = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), "P")
        im.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
        if mode == "P_transparent":
            im.info["transparency"] = 3  # palette index 3 is transparent -> composited onto white
        return im
    raise ValueError(mode)


def assert_matches_hf(image: Image.Image, setting: str, label: str) -> None:
    hf = hf_processor(setting)(images=image)
    hf_pixels = np.asarray(hf["pixel_values"])
    hf_grid = tuple(int(v) for v in np.asarray(hf["image_grid_thw"])[0])

    pixels, grid = preprocess_image(image, ours_params(setting))

    assert pixels.dtype == np.float32
    assert grid == hf_grid, (label, grid, hf_grid)
    assert pixels.shape == hf_pixels.shape, (label, pixels.shape, hf_pixels.shape)
    assert pixels.shape[0] == grid[1] * grid[2]
    diff = float(np.max(np.abs(pixels.astype(np.float64) - hf_pixels.astype(np.float64))))
    MAX_DIFFS[label] = diff
    assert diff <= TOL, f"{label}: max abs diff {diff}"


# (width, height) -> settings it is checked under. qwen2vl_2b only gets moderate sizes (its max is 12.8 Mpx).
SIZE_CASES = [
    ((123, 77), ["tiny", "qwen2vl_2b", "hf_default", "p16_m2_t2_half", "p14_m1_t1_big_min"]),
    ((64, 201), ["tiny", "qwen2vl_2b", "hf_default", "p16_m2_t2_half", "p14_m1_t1_big_min"]),
    ((1, 1), ["tiny", "qwen2vl_2b", "hf_default", "p16_m2_t2_half"]),
    ((28, 28), ["tiny", "qwen2vl_2b", "hf_default", "p14_m1_t1_big_min"]),
    ((56, 1000), ["tiny", "qwen2vl_2b", "hf_default"]),
    ((1000, 56), ["tiny", "p16_m2_t2_half"]),
    ((3000, 2000), ["tiny", "hf_default", "p16_m2_t2_half"]),  # must be downscaled by max_pixels
    ((640, 480), ["qwen2vl_2b", "hf_default"]),
    ((42, 70), ["tiny", "qwen2vl_2b"]),  # 42/28 = 1.5 and 70/28 = 2.5: round half to even
    ((200, 1), ["tiny"]),  # aspect ratio exactly 200 is allowed
]


@pytest.mark.parametrize(
    "size,setting",
    [(size, setting) for size, settings in SIZE_CASES for setting in settings],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_rgb_noise_matches_transformers(size, setting):
    width, height = size
    assert_matches_hf(make_image("RGB", width, height), setting, f"RGB {width}x{height} {setting}")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P_transparent"])
@pytest.mark.parametrize("size", [(123, 77), (64, 201)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_non_rgb_modes_match_transformers(mode, size):
    width, height = size
    image = make_image(mode, width, height, seed=3)
    for setting in ("tiny", "hf_default"):
        assert_matches_hf(image, setting, f"{mode} {width}x{height} {setting}")


@pytest.mark.parametrize(
    "mode,flags",
    [
        ("RGB", dict(do_rescale=False)),
        ("RGB", dict(do_normalize=False)),
        ("RGB", dict(do_rescale=False, do_normalize=False)),
        ("RGB", dict(do_convert_rgb=False, rescale_factor=1 / 127.5)),
        ("RGBA", dict(do_convert_rgb=False, do_normalize=False)),  # 4 channels all the way through
        ("L", dict(do_convert_rgb=False, do_normalize=False)),  # 1 channel
        ("RGB", dict(resample=2)),  # BILINEAR
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]:.3g}" for k in v),
)
def test_processing_flags_match_transformers(mode, flags):
    image = make_image(mode, 123, 77, seed=6)
    mn, mx, p, t, m, mean, std = SETTINGS["tiny"]
    hf = Qwen2VLImageProcessorPil(
        size={"shortest_edge": mn, "longest_edge": mx}, patch_size=p, temporal_patch_size=t, merge_size=m,
        image_mean=list(mean), image_std=list(std), **flags,
    )(images=image)
    params = dataclasses.replace(ours_params("tiny"), **flags)
    ours, grid = preprocess_image(image, params)
    assert grid == tuple(int(v) for v in np.asarray(hf["image_grid_thw"])[0])
    assert ours.shape == np.asarray(hf["pixel_values"]).shape
    diff = float(np.max(np.abs(ours.astype(np.float64) - np.asarray(hf["pixel_values"], dtype=np.float64))))
    MAX_DIFFS[f"{mode} flags {flags}"] = diff
    assert diff <= TOL


def test_large_image_is_downscaled_within_max_pixels():
    image = make_image("RGB", 3000, 2000, seed=5)
    params = ours_params("tiny")
    pixels, (t, gh, gw) = preprocess_image(image, params)
    assert t == 1
    assert gh * gw * params.patch_size**2 <= params.max_pixels
    assert gh % params.merge_size == 0 and gw % params.merge_size == 0
    assert pixels.shape == (gh * gw, 3 * params.temporal_patch_size * params.patch_size**2)


def test_tiny_image_is_upscaled_to_min_pixels():
    pixels, grid = preprocess_image(make_image("RGB", 1, 1), ours_params("tiny"))
    assert grid == (1, 4, 4)  # 1x1 -> 56x56: transformers accepts it (checked against it above)
    assert pixels.shape == (16, 3 * 2 * 14 * 14)


def test_patch_order_is_merge_block_order():
    """Row r of pixel_values is the patch of merge block (r // m^2) at (r % m^2) // m, r % m; temporal copies equal."""
    params = ours_params("tiny")
    image = make_image("RGB", 112, 56)  # -> exactly 56x112: grid 4x8, no resampling
    pixels, (_, gh, gw) = preprocess_image(image, params)
    assert (gh, gw) == (4, 8)
    p, m, t = params.patch_size, params.merge_size, params.temporal_patch_size
    hwc = np.asarray(image).astype(np.float64) / 255
    normed = ((hwc - np.array(params.image_mean)) / np.array(params.image_std)).transpose(2, 0, 1)  # CHW
    row = 0
    for bh in range(gh // m):
        for bw in range(gw // m):
            for mh in range(m):
                for mw in range(m):
                    y, x = (bh * m + mh) * p, (bw * m + mw) * p
                    expected = normed[:, y:y + p, x:x + p]  # C, P, P
                    got = pixels[row].reshape(3, t, p, p)
                    for k in range(t):
                        np.testing.assert_allclose(got[:, k], expected, atol=1e-5)
                    row += 1
    assert row == gh * gw


def test_extreme_aspect_ratio_is_a_user_error():
    image = make_image("RGB", 201, 1)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_processor("tiny")(images=image)
    with pytest.raises(UserError, match="aspect ratio") as info:
        preprocess_image(image, ours_params("tiny"))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        preprocess_image(make_image("RGB", 1, 1000), ours_params("qwen2vl_2b"))


def test_smart_resize_equals_transformers():
    """Exhaustive over many sizes: same rounding (Python round = half to even), same clamping, same errors."""
    cases = 0
    for factor, mn, mx in [(28, 3136, 50176), (28, 3136, 12845056), (28, 3136, 1003520), (32, 4096, 65536),
                           (14, 20000, 40000)]:
        for h in list(range(1, 300, 1)) + [333, 517, 1000, 1080, 1920, 2000, 3000, 4032, 8000]:
            for w in (1, 2, 13, 14, 27, 28, 41, 42, 43, 69, 70, 71, 98, 99, 123, 201, 640, 1999, 5000):
                try:
                    expected = hf_smart_resize(h, w, factor=factor, min_pixels=mn, max_pixels=mx)
                except ValueError:
                    with pytest.raises(ValueError):
                        smart_resize(h, w, factor, mn, mx)
                    continue
                assert smart_resize(h, w, factor, mn, mx) == expected, (h, w, factor, mn, mx)
                cases += 1
    assert cases > 10000
    assert smart_resize(42, 70, 28, 0, 10**9) == (56, 56)  # banker's rounding: round(1.5)=2, round(2.5)=2


# ---------------------------------------------------------------------------------------------- load_image


def test_load_image_roundtrip_keeps_mode_and_transparency(tmp_path):
    src = make_image("P_transparent", 90, 61, seed=11)
    path = tmp_path / "pal.png"
    src.save(path)
    loaded = load_image(path)
    assert loaded.mode == "P" and loaded.size == (90, 61)
    assert loaded.info.get("transparency") is not None
    assert_matches_hf(loaded, "tiny", "P_transparent from PNG file")
    loaded_str = load_image(str(path))
    assert np.array_equal(np.asarray(loaded_str), np.asarray(src))


def test_load_image_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(UserError) as info:
        load_image(missing)
    assert str(info.value) == f"image not found: {missing}"


def test_load_image_directory(tmp_path):
    with pytest.raises(UserError, match="not an image file"):
        load_image(tmp_path)


def test_load_image_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG, just some text\n" * 10)
    with pytest.raises(UserError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"not an image file: {path} (")
    assert "\n" not in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    make_image("RGB", 200, 150, seed=2).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        load_image(path)
    assert str(info.value).startswith(f"not an image file: {path} (")


def test_load_image_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="not an image file"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- params


def test_from_preprocessor_config_old_keys():
    # Qwen2-VL-2B-Instruct's preprocessor_config.json (old style: min/max_pixels at the top level).
    cfg = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }
    params = Qwen2VLImageParams.from_preprocessor_config(cfg)
    assert params == ours_params("qwen2vl_2b")
    hf = Qwen2VLImageProcessorPil.from_dict(dict(cfg))
    assert (params.min_pixels, params.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    image = make_image("RGB", 150, 100, seed=9)
    ours, grid = preprocess_image(image, params)
    ref = hf(images=image)
    assert grid == tuple(int(v) for v in np.asarray(ref["image_grid_thw"])[0])
    assert float(np.max(np.abs(ours - np.asarray(ref["pixel_values"])))) <= TOL


def test_from_preprocessor_config_new_size_keys():
    cfg = {
        "size": {"shortest_edge": 3136, "longest_edge": 50176},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "do_rescale": True, "rescale_factor": 0.00392156862745098,
        "do_normalize": True, "do_convert_rgb": True,
    }
    params = Qwen2VLImageParams.from_preprocessor_config(cfg)
    assert (params.min_pixels, params.max_pixels, params.patch_size) == (3136, 50176, 16)
    assert params.image_mean == (0.5, 0.5, 0.5) and params.image_std == (0.5, 0.5, 0.5)
    hf = Qwen2VLImageProcessorPil.from_dict(dict(cfg))
    assert (params.min_pixels, params.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    image = make_image("RGBA", 97, 131, seed=4)
    ours, grid = preprocess_image(image, params)
    ref = hf(images=image)
    assert grid == tuple(int(v) for v in np.asarray(ref["image_grid_thw"])[0])
    assert float(np.max(np.abs(ours - np.asarray(ref["pixel_values"])))) <= TOL


def test_from_preprocessor_config_top_level_wins_and_defaults():
    both = {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 100, "max_pixels": 5000}
    params = Qwen2VLImageParams.from_preprocessor_config(both)
    hf = Qwen2VLImageProcessorPil.from_dict(dict(both))
    assert (params.min_pixels, params.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"]) == (100, 5000)

    defaults = Qwen2VLImageParams.from_preprocessor_config({})
    hf = Qwen2VLImageProcessorPil()
    assert defaults == ours_params("hf_default")
    assert (defaults.min_pixels, defaults.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert (defaults.patch_size, defaults.temporal_patch_size, defaults.merge_size) == (
        hf.patch_size, hf.temporal_patch_size, hf.merge_size)
    assert defaults.image_mean == tuple(hf.image_mean) and defaults.image_std == tuple(hf.image_std)
    assert defaults.resample == int(hf.resample) == 3
    assert defaults.rescale_factor == hf.rescale_factor
    assert (defaults.do_rescale, defaults.do_normalize, defaults.do_convert_rgb) == (True, True, True)


def test_params_dict_roundtrip():
    for setting in SETTINGS:
        params = ours_params(setting)
        d = json.loads(json.dumps(params.to_dict()))
        assert Qwen2VLImageParams.from_dict(d) == params


# ---------------------------------------------------------------------------------------------- torch-free


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys; import mmexport.runtime.image, mmexport.runtime.imageops, mmexport.families.qwen2_vl.image; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
