"""LLaVA-OneVision image preprocessing and image-token layout, torch-free (numpy + Pillow).

Preprocessing re-implements transformers' `LlavaOnevisionImageProcessorPil` (transformers 5.x) step for step:

  one image in the prompt ("anyres"):
    1. RGB (transparency composited onto white), the best resolution among `image_grid_pinpoints`
       (`select_best_resolution`: most effective pixels, then least waste);
    2. the uint8 image resized by Pillow into that resolution keeping its aspect ratio
       (`get_patch_output_size`), padded with 0 to it, centred (the odd pixel at the bottom/right);
    3. cut into crop_size tiles, row-major; the whole image resized (stretched) to `size` goes first (the base view);
    4. each view resized to `size` (a no-op for the tiles), rescaled and normalized.
  several images in the prompt (the processor's multi-image path, `batch_num_images > 1`):
    each image padded to a square with the mean colour (`pad_to_square`), resized to `size`: one view.

The image-token layout mirrors `LlavaOnevisionModel.pack_image_features`: the base view's tokens, then the
tiles' feature map laid out as one image, the padding rows/columns cut (`unpad_image`), shrunk bilinearly when
it holds more than 1.1 x anyres_max_N tiles' worth of tokens, and an `image_newline` token after every row; a
single-view image is its tokens plus one newline. `pack_tables` expresses that as a gather with weights over the
projected features of all views (+ the newline row), which the projector graph applies; `image_token_count`
is LlavaOnevisionProcessor's count (the same number, tested against both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, image_chw, pad, rescale_normalize, resize_array_with_pil, split_tiles, triple

# LlavaOnevisionImageProcessorPil's class defaults
_DEFAULT_SIZE = 384
_DEFAULT_PINPOINTS = [[a, b] for a in range(384, 2305, 384) for b in range(384, 2305, 384)]
_DEFAULT_RESAMPLE = 3  # BICUBIC


@dataclass(frozen=True)
class OnevisionImageParams(ParamsDict):
    """The knobs of LlavaOnevisionImageProcessorPil that preprocessing reads."""

    size_height: int  # every view is resized to this (`size`)
    size_width: int
    base_height: int  # the base view (`size`'s height/width, or shortest_edge x shortest_edge)
    base_width: int
    tile: int  # tile side (crop_size.height, else size.height, else shortest_edge)
    grid_pinpoints: list  # [[height, width], ...]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "OnevisionImageParams":
        """From a checkpoint's preprocessor_config.json; a missing key takes the PIL processor's default."""
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        size = get("size", {"height": _DEFAULT_SIZE, "width": _DEFAULT_SIZE})
        if not isinstance(size, dict):
            raise UserError(f"preprocessor config 'size' must be an object, got {size!r}")
        if size.get("height") and size.get("width"):
            sh, sw = int(size["height"]), int(size["width"])
        elif size.get("shortest_edge"):
            sh = sw = int(size["shortest_edge"])  # every view it resizes is square
        else:
            raise UserError(f"preprocessor config 'size' {size!r}: expected height/width or shortest_edge")
        crop = cfg.get("crop_size") or {}
        if cfg.get("do_center_crop"):
            raise UserError("LLaVA-OneVision preprocessing with do_center_crop is not supported")
        tile = int(crop.get("height") or size.get("height") or size.get("shortest_edge"))
        pinpoints = [[int(h), int(w)] for h, w in get("image_grid_pinpoints", _DEFAULT_PINPOINTS)]
        if not pinpoints:
            raise UserError("preprocessor config 'image_grid_pinpoints' is empty")
        for h, w in pinpoints:
            if h % tile or w % tile:
                raise UserError(f"image_grid_pinpoints entry {h}x{w} is not whole {tile}-pixel tiles")
        return cls(
            size_height=sh, size_width=sw, base_height=sh, base_width=sw, tile=tile, grid_pinpoints=pinpoints,
            image_mean=triple(get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=triple(get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_resize=bool(get("do_resize", True)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of every view (the tower's picture size)."""
        return self.size_height, self.size_width

    @property
    def max_tiles(self) -> int:
        """The most tiles any pinpoint cuts (the base view not counted)."""
        return max((h // self.tile) * (w // self.tile) for h, w in self.grid_pinpoints)


@dataclass
class OnevisionImage:
    pixel_values: np.ndarray  # [views, 3, H, W] float32: the base view, then the tiles row-major
    image_size: tuple[int, int]  # the original (height, width)
    grid: tuple[int, int] | None  # (rows, cols) of tiles; None = one view (a multi-image prompt)

    @property
    def num_views(self) -> int:
        return int(self.pixel_values.shape[0])


# -- resolution and sizes (image_processing_utils) ---------------------------------------------------------
def select_best_resolution(original_size: tuple[int, int], possible: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: (height, width) of the pinpoint that keeps the
    most of the image's pixels, then wastes the fewest."""
    oh, ow = original_size
    best, max_eff, min_waste = None, 0, float("inf")
    for h, w in possible:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best = eff, waste, (int(h), int(w))
    assert best is not None
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """get_patch_output_size: the size an image is resized to inside `target`, aspect ratio kept."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def _resize(chw: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """transformers' resize of a CHW uint8 array through Pillow (the same size: Pillow returns a copy)."""
    if chw.shape[1:] == (height, width):
        return chw
    return np.moveaxis(resize_array_with_pil(np.moveaxis(chw, 0, -1), height, width, resample), -1, 0)


def _pad_to_square(chw: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """LlavaOnevisionImageProcessorPil.pad_to_square: centred on a square of `color` (the offset rounded down)."""
    c, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.empty((c, side, side), dtype=chw.dtype)
    out[:] = np.asarray(color, dtype=chw.dtype)[:, None, None]
    if w > h:
        s = (side - h) // 2
        out[:, s:s + h, :] = chw
    else:
        s = (side - w) // 2
        out[:, :, s:s + w] = chw
    return out


def preprocess_onevision(image: Image.Image, params: OnevisionImageParams, multi_image: bool = False) -> OnevisionImage:
    """One image as LlavaOnevisionImageProcessorPil makes it: anyres tiles + base view, or (`multi_image`: the
    prompt holds several images) one view padded to a square."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_onevision expects a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    chw = image_chw(image, params.do_convert_rgb)
    p = params
    if multi_image:
        views, grid = [_pad_to_square(chw, [int(m * 255) for m in p.image_mean])], None
    else:
        best = select_best_resolution((height, width), p.grid_pinpoints)
        nh, nw = patch_output_size(height, width, best)
        canvas = pad(_resize(chw, nh, nw, p.resample), best[0], best[1], 0, center=True)
        tiles = split_tiles(canvas, p.tile, p.tile)
        views = [_resize(chw, p.base_height, p.base_width, p.resample), *tiles]
        grid = (best[0] // p.tile, best[1] // p.tile)
    out = []
    for v in views:
        if p.do_resize:
            v = _resize(v, p.size_height, p.size_width, p.resample)
        out.append(np.asarray(rescale_normalize(v, p), dtype=np.float32))
    return OnevisionImage(np.ascontiguousarray(np.stack(out)), (height, width), grid)


# -- the image tokens ---------------------------------------------------------------------------------------
def max_patches_of(vision_aspect_ratio: str) -> int:
    """`anyres_max_9` -> 9 (as transformers reads it: the string stripped of those characters)."""
    try:
        return int(vision_aspect_ratio.strip("anyres_max_"))
    except ValueError:
        raise UserError(f"vision_aspect_ratio {vision_aspect_ratio!r}: expected anyres_max_N") from None


def unpadded_shape(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """unpad_image on a rows x cols feature map of an image of `image_size` (h, w): (top, bottom, left, right)
    of the part kept."""
    oh, ow = image_size
    if ow / oh > cols / rows:
        new_h = int(round(oh * (cols / ow), 7))
        p = (rows - new_h) // 2
        return p, rows - p, 0, cols
    new_w = int(round(ow * (rows / oh), 7))
    p = (cols - new_w) // 2
    return 0, rows, p, cols - p


def image_token_count(image_size: tuple[int, int], params: OnevisionImageParams, num_image_tokens: int,
                      vision_aspect_ratio: str, multi_image: bool) -> int:
    """LlavaOnevisionProcessor.replace_image_token's count: `num_image_tokens` per view (side² patches), the
    unpadded tile map (shrunk past anyres_max_N), a newline per row; +1 newline for a multi-image view."""
    if multi_image:
        n = num_image_tokens + 1
    else:
        oh, ow = image_size
        bh, bw = select_best_resolution((oh, ow), params.grid_pinpoints)
        side = int(math.sqrt(num_image_tokens))
        ch, cw = side * (bh // params.size_height), side * (bw // params.size_width)
        if ow / oh > cw / ch:
            new_h = int(round(oh * (cw / ow), 7))
            ch -= ((ch - new_h) // 2) * 2
        else:
            new_w = int(round(ow * (ch / oh), 7))
            cw -= ((cw - new_w) // 2) * 2
        unpadded, newlines = ch * cw, ch
        ratio = math.sqrt(ch * cw / (max_patches_of(vision_aspect_ratio) * side**2))
        if ratio > 1.1:
            unpadded, newlines = int(ch // ratio) * int(cw // ratio), int(ch // ratio)
        n = unpadded + newlines + num_image_tokens
    return n


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's upsample_bilinear2d along one axis (align_corners=False, no scale given): for each output index
    the two source indices and their weights, in float32 as torch computes them (the float32 scale times
    (i + 0.5) minus 0.5 rounded once, as a fused multiply-add does: exact in float64, then to float32)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)  # floor (src >= 0)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def pack_tables(img: OnevisionImage, side: int, vision_aspect_ratio: str) -> tuple[np.ndarray, np.ndarray]:
    """LlavaOnevisionModel.pack_image_features as a weighted gather: (index [T, 4] int64, weight [T, 4] float32).

    Row t of the packed image features is sum_k weight[t, k] * rows[index[t, k]], where `rows` are the projected
    features of all views flattened ([views * side², hidden]) followed by the image_newline row (index views *
    side²). Taps a token does not use have weight 0 and index 0.
    """
    per_view = side * side
    newline = img.num_views * per_view
    idx: list[np.ndarray] = []
    wts: list[np.ndarray] = []

    def one(rows: np.ndarray) -> None:
        i = np.zeros((len(rows), 4), dtype=np.int64)
        w = np.zeros((len(rows), 4), dtype=np.float32)
        i[:, 0] = rows
        w[:, 0] = 1
        idx.append(i)
        wts.append(w)

    one(np.arange(per_view))  # the base view (or the only one)
    if img.grid is None:
        one(np.asarray([newline]))
    else:
        gr, gc = img.grid
        R, C = gr * side, gc * side
        r, c = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
        fmap = (1 + (r // side) * gc + (c // side)) * per_view + (r % side) * side + (c % side)  # [R, C] row index
        top, bottom, left, right = unpadded_shape(img.image_size, R, C)
        fmap = fmap[top:bottom, left:right]
        h, w = fmap.shape
        ratio = math.sqrt(h * w / (max_patches_of(vision_aspect_ratio) * side**2))
        if ratio > 1.1:
            oh, ow = int(h // ratio), int(w // ratio)
            y0, y1, wy0, wy1 = _bilinear_taps(h, oh)
            x0, x1, wx0, wx1 = _bilinear_taps(w, ow)
            ii = np.stack([fmap[y0][:, x0], fmap[y0][:, x1], fmap[y1][:, x0], fmap[y1][:, x1]], axis=-1)  # [oh, ow, 4]
            ww = np.stack([wy0[:, None] * wx0[None], wy0[:, None] * wx1[None], wy1[:, None] * wx0[None], wy1[:, None] * wx1[None]], axis=-1)
        else:
            oh, ow = h, w
            ii = np.zeros((h, w, 4), dtype=np.int64)
            ii[..., 0] = fmap
            ww = np.zeros((h, w, 4), dtype=np.float32)
            ww[..., 0] = 1
        nl_i = np.zeros((oh, 1, 4), dtype=np.int64)
        nl_i[..., 0] = newline
        nl_w = np.zeros((oh, 1, 4), dtype=np.float32)
        nl_w[..., 0] = 1
        idx.append(np.concatenate([ii, nl_i], axis=1).reshape(-1, 4))
        wts.append(np.concatenate([ww.astype(np.float32), nl_w], axis=1).reshape(-1, 4))
    return np.ascontiguousarray(np.concatenate(idx)), np.ascontiguousarray(np.concatenate(wts), dtype=np.float32)
