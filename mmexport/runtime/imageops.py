"""Image operations every family's preprocessing composes (numpy + Pillow; no torch).

Each mirrors the transformers function of the same role (`image_transforms` / the PIL image processors of
transformers 5.x) closely enough to give the same float32 pixels: RGB conversion compositing transparency
onto white, resizing the uint8 image with Pillow, rescale in float64 then float32, normalize in float32,
padding, centre crop, splitting into tiles and patchifying. Families (mmexport/families/*/image.py) build
their processors from these; tests compare each family's result with transformers' own processor.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, fields
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError

# transformers.utils.constants
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def triple(value: Any, name: str) -> tuple[float, float, float]:
    """A per-channel constant as a 3-tuple of floats; a scalar applies to all three channels."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise UserError(f"{name} must have 3 values (one per RGB channel), got {len(values)}")
    return values  # type: ignore[return-value]


class ParamsDict:
    """`to_dict` / `from_dict` for a frozen dataclass of a processor's knobs (manifest.json's "image" table):
    tuples become lists; reading coerces each value to its field's type (int, float, bool, or a per-channel
    triple) and names a missing key in one line; only the knobs in `optional` may be absent (older manifests)."""

    optional: tuple[str, ...] = ("resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                if f.default is MISSING or f.name not in cls.optional:
                    raise UserError(f"image preprocessing parameters lack the key {f.name!r}")
                continue
            kind = str(f.type)
            value = d[f.name]
            kwargs[f.name] = (triple(value, f.name) if kind.startswith("tuple") else bool(value) if kind == "bool"
                              else int(value) if kind == "int" else float(value) if kind == "float" else value)
        return cls(**kwargs)


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: composite transparency (an alpha band or a `transparency`
    entry, as in palette / grayscale PNGs and GIFs) onto white, then RGB."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def resize_array_with_pil(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """transformers.image_transforms.resize for a channels-last array: through a uint8 PIL image and back.

    Only reached with do_convert_rgb=False and a non-RGB input; an RGB uint8 image is resized directly.
    Returns channels-last, with the channel axis kept even for one channel.
    """
    do_rescale = False  # _rescale_for_pil_conversion
    if array.dtype != np.uint8:
        if np.allclose(array, array.astype(int)):
            if not (np.all(array >= 0) and np.all(array <= 255)):
                raise UserError(f"image values outside [0, 255] ([{array.min()}, {array.max()}]) cannot be resized; "
                                "enable do_convert_rgb")
        elif np.all(array >= 0) and np.all(array <= 1):
            do_rescale = True
        else:
            raise UserError(f"image values outside [0, 1] ([{array.min()}, {array.max()}]) cannot be resized; "
                            "enable do_convert_rgb")
    squeezed = np.squeeze(array, axis=-1) if array.shape[-1] == 1 else array
    if do_rescale:
        squeezed = (squeezed.astype(np.float64) * 255).astype(np.float32)
    pil = Image.fromarray(squeezed.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample))
    if out.ndim == 2:
        out = out[..., None]
    if do_rescale:
        out = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    return out


def resized_chw(image: Image.Image, height: int, width: int, resample: int, convert_rgb: bool = True) -> np.ndarray:
    """The image converted to RGB (when asked) and resized by Pillow to (height, width): CHW, uint8 for an RGB
    image (Pillow resizes the uint8 image, as transformers' np.array -> Image.fromarray round trip does)."""
    if convert_rgb:
        resized = np.array(to_rgb(image).resize((width, height), resample=resample))  # HWC uint8
    else:
        array = np.array(image)
        if array.ndim == 2:
            array = array[..., None]
        resized = resize_array_with_pil(array, height, width, resample)
    return np.moveaxis(resized, -1, 0)


def image_chw(image: Image.Image, convert_rgb: bool = True) -> np.ndarray:
    """The image as a CHW array (RGB when asked), not resized."""
    array = np.array(to_rgb(image) if convert_rgb else image)
    if array.ndim == 2:
        array = array[..., None]
    return np.moveaxis(array, -1, 0)


def rescale(chw: np.ndarray, factor: float) -> np.ndarray:
    """image_transforms.rescale: upcast to float64, scale, downcast to float32."""
    return (chw.astype(np.float64) * factor).astype(np.float32)


def normalize(chw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std per channel, in the array's float dtype (float32 after `rescale`)."""
    if chw.shape[0] != len(mean):
        raise UserError(f"image has {chw.shape[0]} channels but image_mean/image_std have {len(mean)} values; enable do_convert_rgb")
    if not np.issubdtype(chw.dtype, np.floating):
        chw = chw.astype(np.float32)
    m = np.array(mean, dtype=chw.dtype)[:, None, None]
    s = np.array(std, dtype=chw.dtype)[:, None, None]
    return (chw - m) / s


def rescale_normalize(chw: np.ndarray, params: Any) -> np.ndarray:
    """`rescale` then `normalize` as a processor's do_rescale / rescale_factor / do_normalize / image_mean /
    image_std say (any object with those attributes)."""
    if params.do_rescale:
        chw = rescale(chw, params.rescale_factor)
    if params.do_normalize:
        chw = normalize(chw, params.image_mean, params.image_std)
    return chw


def pad(chw: np.ndarray, height: int, width: int, value: float = 0, center: bool = False) -> np.ndarray:
    """Pad CHW to (height, width) with a constant: bottom/right, or evenly on both sides (`center`, the extra
    pixel at the bottom/right as transformers' `pad` with symmetric padding does)."""
    dh, dw = height - chw.shape[1], width - chw.shape[2]
    if dh < 0 or dw < 0:
        raise ValueError(f"cannot pad {chw.shape[1]}x{chw.shape[2]} to {height}x{width}")
    top, left = (dh // 2, dw // 2) if center else (0, 0)
    return np.pad(chw, ((0, 0), (top, dh - top), (left, dw - left)), mode="constant", constant_values=value)


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """image_transforms.center_crop for a crop no larger than the image."""
    h, w = chw.shape[1:]
    top = (h - height) // 2
    left = (w - width) // 2
    return chw[:, top:top + height, left:left + width]


def split_tiles(chw: np.ndarray, tile_h: int, tile_w: int) -> np.ndarray:
    """CHW -> [rows * cols, C, tile_h, tile_w], tiles in row-major order (the image must be whole tiles)."""
    c, h, w = chw.shape
    rows, cols = h // tile_h, w // tile_w
    return chw.reshape(c, rows, tile_h, cols, tile_w).transpose(1, 3, 0, 2, 4).reshape(rows * cols, c, tile_h, tile_w)


def patchify_merge_blocks(chw: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int = 1) -> np.ndarray:
    """CHW float32 -> [grid_h * grid_w, C * T * P * P]: patches in merge-block order (merge_size x merge_size
    neighbouring patches consecutive, as Qwen2-VL's processors emit them), each patch repeated
    `temporal_patch_size` times along the temporal axis (a still image is a one-frame video)."""
    image = np.asarray(chw, dtype=np.float32)
    channel, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(channel, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))  # (gh, gw, mh, mw, C, ph, pw)
    patches = np.broadcast_to(patches[:, :, :, :, :, None, :, :], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size), dtype=np.float32)


# -- transformers' torchvision backend (TorchvisionBackend), for processors that ship no PIL class --------------
def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add a*b + c, rounded once (the float64 product of two float32 values is exact)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ATen's `compute_indices_weights_linear` (align_corners=False, no antialias) in float32: for each output
    index the two source indices and their weights. The source index `scale * (i + 0.5) - 0.5` is one fused
    multiply-add in PyTorch's CPU build (bit-identical weights only with it)."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = _fma32(np.full_like(dst, scale), dst, np.full_like(dst, -0.5))
    src = np.where(src < 0, np.float32(0), src).astype(np.float32)
    i0 = src.astype(np.int64)  # truncation of a non-negative value
    i1 = i0 + (i0 < in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return i0, i1, w0, w1


def resize_bilinear_torch(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(x.float(), (height, width), mode="bilinear", align_corners=False,
    antialias=False)` on a CHW array (torchvision's `resize(..., antialias=False)` of a float tensor is this call),
    in float32 with the CPU kernel's order of operations and fused multiply-adds: along the width first,
    `t = fma(x0, w0, x1 * w1)` for the two source rows, then `fma(t0, h0, t1 * h1)`. Bit-identical to
    PyTorch 2.13 on x86-64 (tested on odd sizes; scripts/molmo2_golden.py checks torchvision itself)."""
    x = np.asarray(chw, dtype=np.float32)
    h0, h1, wh0, wh1 = _linear_taps(x.shape[1], height)
    c0, c1, ww0, ww1 = _linear_taps(x.shape[2], width)
    shape = (x.shape[0], height, width)
    ww0, ww1 = np.broadcast_to(ww0, shape), np.broadcast_to(ww1, shape)
    wh0, wh1 = np.broadcast_to(wh0[:, None], shape), np.broadcast_to(wh1[:, None], shape)
    r0, r1 = x[:, h0], x[:, h1]  # [C, H', W]
    t0 = _fma32(r0[:, :, c0], ww0, r0[:, :, c1] * ww1)
    t1 = _fma32(r1[:, :, c0], ww0, r1[:, :, c1] * ww1)
    return _fma32(t0, wh0, t1 * wh1)


def resize_uint8_via_float(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 image resized in float (`resize_bilinear_torch`), then rounded half to even and clamped back to
    uint8, as processors do that resize in float to avoid uint8 wrap-around (Molmo2's `resize_and_normalize_image`)."""
    return np.clip(np.round(resize_bilinear_torch(chw, height, width)), 0, 255).astype(np.uint8)


def rescale_normalize_fused(chw: np.ndarray, params: Any) -> np.ndarray:
    """TorchvisionBackend.rescale_and_normalize: with both rescale and normalize, the rescale is folded into the
    float32 mean/std (`mean * (1 / factor)`), then `(x - mean) / std` in float32; otherwise as `rescale_normalize`."""
    if params.do_rescale and params.do_normalize:
        inv = np.float32(1.0 / params.rescale_factor)
        m = (np.asarray(params.image_mean, dtype=np.float32) * inv)[:, None, None]
        s = (np.asarray(params.image_std, dtype=np.float32) * inv)[:, None, None]
        return (chw.astype(np.float32) - m) / s
    if params.do_normalize:
        return normalize(chw.astype(np.float32), params.image_mean, params.image_std)
    if params.do_rescale:
        return (chw.astype(np.float32) * np.float32(params.rescale_factor)).astype(np.float32)
    return chw.astype(np.float32)


# -- tiling shared by the tile-based families (Idefics3 / SmolVLM, InternVL) --------------------------------------
def grid_tiles(image: Image.Image, rows: int, cols: int, tile: int) -> np.ndarray:
    """An RGB image of exactly rows*tile x cols*tile pixels -> [rows * cols, C, tile, tile] uint8 tiles,
    row-major (left to right, then top to bottom), as both Idefics3's split_images and GotOcr2's
    crop_image_to_patches crop them."""
    chw = np.moveaxis(np.array(image), -1, 0)
    if chw.shape[1:] != (rows * tile, cols * tile):
        raise ValueError(f"a {rows}x{cols} grid of {tile}-pixel tiles needs {rows * tile}x{cols * tile} pixels, got {chw.shape[1:]}")
    return split_tiles(chw, tile, tile)


def tiles_with_global(grid_image: Image.Image, rows: int, cols: int, tile: int, global_source: Image.Image,
                      resample: int) -> np.ndarray:
    """The tiles of `grid_image` (rows x cols, row-major) followed by one global view: `global_source` resized
    to a single tile (Idefics3: the grid image itself; InternVL: the original image, its "thumbnail").
    A 1x1 grid is the tile alone (neither family adds a global view then). uint8 [n, C, tile, tile]."""
    tiles = grid_tiles(grid_image, rows, cols, tile)
    if rows * cols == 1:
        return tiles
    thumb = np.moveaxis(np.array(global_source.resize((tile, tile), resample=resample)), -1, 0)
    return np.concatenate([tiles, thumb[None]], axis=0)


def supported_tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, by tile count (stable: cols-major within a
    count), as transformers' `get_all_supported_aspect_ratios` (GotOcr2 / InternVL) lists them."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_tile_grid(height: int, width: int, tile_h: int, tile_w: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows): the grid whose aspect ratio is closest to the image's; on a tie the later (larger) grid wins
    while the image covers more than half of its area (transformers' `get_optimal_tiled_canvas` of GotOcr2, the
    processor InternVL uses; InternVL's original `find_closest_aspect_ratio`)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in supported_tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * cols * rows:
            best = (cols, rows)
    return best


def pixel_shuffle_tokens(x: np.ndarray, scale: int) -> np.ndarray:
    """Space-to-depth over a square token grid: [B, side*side, C] -> [B, (side/scale)^2, C*scale^2], each output
    token the scale x scale neighbourhood of input tokens, in the channel order Idefics3/SmolVLM's connector and
    InternVL's `pixel_shuffle` produce (one and the same layout). The numpy twin of
    families.parts.pixel_shuffle_tokens, which the graphs use; tests hold both to the checkpoints' own."""
    b, seq, c = x.shape
    side = int(round(seq**0.5))
    if side * side != seq or side % scale:
        raise ValueError(f"{seq} tokens are not a square grid divisible by {scale}")
    y = x.reshape(b, side, side // scale, c * scale).transpose(0, 2, 1, 3)
    y = y.reshape(b, side // scale, side // scale, c * scale * scale).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(y.reshape(b, seq // scale**2, c * scale * scale))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Antialiased bilinear (triangle filter) weights of one axis, as Pillow's and PyTorch's resamplers compute
    them in double: per output pixel, the first input index, and the normalized weights [out, taps]."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), in_size) - xmin
        x = (np.arange(xsize) + xmin - center + 0.5) * invscale
        w = np.clip(1.0 - np.abs(x), 0.0, None)
        total = w.sum()
        starts[i] = xmin
        weights[i, :xsize] = w / total if total != 0 else w
    return starts, weights, np.asarray(taps)


def _fixed_point(weights: np.ndarray, flavour: str) -> tuple[np.ndarray, int]:
    """Weights as integers and their precision in bits: Pillow's 22 bits, or PyTorch's uint8 kernel's int16
    weights at the largest precision where the largest weight still fits."""
    if flavour == "pil":
        bits = 22
    else:
        w_max = float(weights.max())
        bits = 0
        while bits < 22 and int(0.5 + w_max * (1 << (bits + 1))) < (1 << 15):
            bits += 1
    v = weights * (1 << bits)
    return np.where(v < 0, v - 0.5, v + 0.5).astype(np.int64), bits


def _resample_axis(img: np.ndarray, out_size: int, axis: int, flavour: str) -> np.ndarray:
    in_size = img.shape[axis]
    starts, weights, _ = _aa_weights(in_size, out_size)
    k, bits = _fixed_point(weights, flavour)
    src = np.moveaxis(img.astype(np.int64), axis, 0)
    acc = np.full((out_size, *src.shape[1:]), 1 << (bits - 1), dtype=np.int64)
    for t in range(k.shape[1]):
        idx = np.minimum(starts + t, in_size - 1)
        acc += k[:, t].reshape(-1, *([1] * (src.ndim - 1))) * src[idx]
    return np.moveaxis(np.clip(acc >> bits, 0, 255).astype(np.uint8), 0, axis)


def resize_bilinear_aa_uint8(hwc: np.ndarray, height: int, width: int, flavour: str = "torch") -> np.ndarray:
    """Antialiased bilinear resize of a uint8 HWC image, bit for bit as torchvision's `resize` (PyTorch's uint8
    `interpolate(..., antialias=True)` kernel: int16 fixed-point weights) or Pillow's BILINEAR (`flavour="pil"`,
    22-bit weights): a horizontal pass, rounded to uint8, then a vertical pass; an axis whose size does not
    change is not resampled. Transformers' torchvision image processors resize uint8 images this way."""
    out = hwc
    if width != hwc.shape[1]:
        out = _resample_axis(out, width, 1, flavour)
    if height != hwc.shape[0]:
        out = _resample_axis(out, height, 0, flavour)
    return out


MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer sides than this many times the shorter


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen2-VL and Emu3 resize an image to.

    Both sides become multiples of `factor`, the pixel count lands in [min_pixels, max_pixels] and the aspect
    ratio is kept as well as possible. Identical to transformers' `smart_resize`, including Python's `round`
    (round half to even). Raises ValueError when the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
