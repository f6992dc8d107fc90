"""Torch-free Qwen2-VL image preprocessing (numpy + Pillow only).

A re-implementation of transformers' PIL-backend processor
`transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil` (transformers 5.x),
step for step, so that the result is bit-for-bit the same pixel_values and image_grid_thw:

1. convert to RGB, compositing any transparency (an alpha band or a `transparency` entry in `info`, as in
   palette / grayscale PNGs and GIFs) onto a white background (`image_transforms.convert_to_rgb`);
2. `smart_resize` to a size divisible by patch_size * merge_size with a pixel count inside
   [min_pixels, max_pixels], and resize the *uint8* PIL image with Pillow (BICUBIC by default);
3. rescale: `uint8 -> float64 * rescale_factor -> float32`;
4. normalize in float32: `(x - mean) / std` per channel;
5. patchify into `[grid_h * grid_w, C * temporal_patch_size * patch_size * patch_size]`, the rows in merge-block
   order (merge_size x merge_size neighbouring patches are consecutive), each patch repeated
   temporal_patch_size times along the temporal axis (a still image is a one-frame video).

Nothing here may import torch or transformers (see `mmexport.runtime`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmexport.errors import UserError

__all__ = [
    "Qwen2VLImageParams",
    "smart_resize",
    "load_image",
    "preprocess_image",
]

# transformers.utils.constants.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the Qwen2-VL defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2VLImageProcessorPil's class defaults.
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_DEFAULT_PATCH_SIZE = 14
_DEFAULT_TEMPORAL_PATCH_SIZE = 2
_DEFAULT_MERGE_SIZE = 2
_DEFAULT_RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC

_MAX_ASPECT_RATIO = 200


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    """A per-channel constant as a 3-tuple of floats; a scalar applies to all three channels."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise UserError(f"{name} must have 3 values (one per RGB channel), got {len(values)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class Qwen2VLImageParams:
    """Everything `preprocess_image` needs; the same knobs as Qwen2VLImageProcessorPil."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE  # PIL resample code (3 = BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """What both sides of the resized image are multiples of."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "Qwen2VLImageParams":
        """From a checkpoint's preprocessor_config.json (already parsed).

        Accepts the old keys (`min_pixels` / `max_pixels` at the top level) and the new
        `size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`; as in transformers, top-level
        `min_pixels` / `max_pixels` win over `size`. The legacy `size = {"min_pixels": .., "max_pixels": ..}`
        is accepted too. A missing key takes Qwen2VLImageProcessorPil's default.
        """
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise UserError(f"preprocessor config 'size' must be an object, got {size!r}")
        min_pixels = size.get("shortest_edge", size.get("min_pixels"))
        max_pixels = size.get("longest_edge", size.get("max_pixels"))
        if cfg.get("min_pixels") is not None:
            min_pixels = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_pixels = cfg["max_pixels"]

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return default if value is None else value

        return cls(
            min_pixels=int(_DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels),
            max_pixels=int(_DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels),
            patch_size=int(get("patch_size", _DEFAULT_PATCH_SIZE)),
            temporal_patch_size=int(get("temporal_patch_size", _DEFAULT_TEMPORAL_PATCH_SIZE)),
            merge_size=int(get("merge_size", _DEFAULT_MERGE_SIZE)),
            image_mean=_triple(get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_triple(get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )

    def to_dict(self) -> dict:
        """JSON-able; `from_dict(p.to_dict()) == p`."""
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2VLImageParams":
        """Inverse of `to_dict`."""
        try:
            return cls(
                min_pixels=int(d["min_pixels"]),
                max_pixels=int(d["max_pixels"]),
                patch_size=int(d["patch_size"]),
                temporal_patch_size=int(d["temporal_patch_size"]),
                merge_size=int(d["merge_size"]),
                image_mean=_triple(d["image_mean"], "image_mean"),
                image_std=_triple(d["image_std"], "image_std"),
                resample=int(d.get("resample", _DEFAULT_RESAMPLE)),
                do_rescale=bool(d.get("do_rescale", True)),
                rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                do_normalize=bool(d.get("do_normalize", True)),
                do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            )
        except KeyError as e:
            raise UserError(f"image preprocessing parameters lack the key {e.args[0]!r}") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to.

    Both sides become multiples of `factor`, the pixel count lands in [min_pixels, max_pixels] and the aspect
    ratio is kept as well as possible. Identical to transformers' `smart_resize`, including Python's `round`
    (round half to even). Raises ValueError when the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, "
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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied as transformers'
    `load_image` applies it (`PIL.ImageOps.exif_transpose`: a phone photo stored sideways with an
    Orientation tag comes out upright); no mode conversion.

    Only a regular file is opened (checked before opening, without blocking: a FIFO or a device is
    refused, not read). Raises UserError for a missing file, a directory or other non-regular file, or a
    file that is not a decodable image (unknown format, truncated or corrupt data).
    """
    from PIL import ImageOps

    from ..artifact.files import NotRegularFile, open_regular

    try:
        with open_regular(path) as f, Image.open(f) as im:
            im.load()
            # exif_transpose returns a new image (transposed, or a copy), detached from the file; copy()
            # semantics keep mode and info (multi-frame formats would keep the file open otherwise).
            image = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except NotRegularFile as e:
        raise UserError(f"not an image file: {path} (it is a {e.kind})") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"not an image file: {path} (unrecognized image format)") from None
    except PermissionError as e:
        raise UserError(f"cannot read image: {path} ({e.strerror or e})") from None
    except Exception as e:
        # Pillow reports truncated / corrupt data as OSError, SyntaxError (bad chunk), ValueError or EOFError,
        # and a malformed EXIF block as whatever its parser hits (struct.error, KeyError, ...): all are the file's.
        reason = str(e).strip() or type(e).__name__
        raise UserError(f"not an image file: {path} ({reason})") from None
    return image


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: composite transparency onto white, then RGB."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _resize_array_with_pil(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """transformers.image_transforms.resize for a channels-last array: through a uint8 PIL image and back.

    Only reached with do_convert_rgb=False and a non-RGB input; an RGB uint8 image is resized directly.
    Returns channels-last, with the channel axis kept even for one channel.
    """
    # _rescale_for_pil_conversion
    do_rescale = False
    if array.dtype != np.uint8:
        if np.allclose(array, array.astype(int)):
            if not (np.all(array >= 0) and np.all(array <= 255)):
                raise UserError(
                    f"image values outside [0, 255] ([{array.min()}, {array.max()}]) cannot be resized; "
                    "enable do_convert_rgb"
                )
        elif np.all(array >= 0) and np.all(array <= 1):
            do_rescale = True
        else:
            raise UserError(
                f"image values outside [0, 1] ([{array.min()}, {array.max()}]) cannot be resized; "
                "enable do_convert_rgb"
            )
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


def _patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Qwen2VLImageProcessorPil.patchify: CHW float32 -> [grid_h * grid_w, C * T * P * P], merge-block order."""
    image = np.asarray(image, dtype=np.float32)
    channel, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # (gh, gw, mh, mw, C, ph, pw)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None, :, :],
        (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]),
    )
    return np.ascontiguousarray(
        patches.reshape(grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size),
        dtype=np.float32,
    )


def preprocess_image(
    image: Image.Image, params: Qwen2VLImageParams
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w)).

    Equal to `Qwen2VLImageProcessorPil(...)(image)` for a single image. Raises UserError for an aspect ratio
    above 200 (what transformers' ValueError means for a user).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")

    width, height = image.size
    if width < 1 or height < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    try:
        new_h, new_w = smart_resize(
            height, width, factor=params.factor, min_pixels=params.min_pixels, max_pixels=params.max_pixels
        )
    except ValueError:
        ratio = max(height, width) / min(height, width)
        raise UserError(
            f"image of {width}x{height} pixels has an aspect ratio of {ratio:.1f}:1; "
            f"Qwen2-VL accepts at most {_MAX_ASPECT_RATIO}:1 (crop or pad the image)"
        ) from None

    if params.do_convert_rgb:
        rgb = _convert_to_rgb(image)
        # PIL resizes the uint8 RGB image; same as transformers' np.array -> Image.fromarray round trip.
        resized = np.array(rgb.resize((new_w, new_h), resample=params.resample))  # HWC uint8
    else:
        array = np.array(image)
        if array.ndim == 2:
            array = array[..., None]
        resized = _resize_array_with_pil(array, new_h, new_w, params.resample)
    chw = np.moveaxis(resized, -1, 0)

    if params.do_rescale:
        # image_transforms.rescale: upcast to float64, scale, downcast to float32.
        chw = (chw.astype(np.float64) * params.rescale_factor).astype(np.float32)
    if params.do_normalize:
        if chw.shape[0] != len(params.image_mean):
            raise UserError(
                f"image has {chw.shape[0]} channels but image_mean/image_std have {len(params.image_mean)} values; "
                "enable do_convert_rgb"
            )
        if not np.issubdtype(chw.dtype, np.floating):
            chw = chw.astype(np.float32)
        mean = np.array(params.image_mean, dtype=chw.dtype)[:, None, None]
        std = np.array(params.image_std, dtype=chw.dtype)[:, None, None]
        chw = (chw - mean) / std

    pixel_values = _patchify(
        chw,
        patch_size=params.patch_size,
        merge_size=params.merge_size,
        temporal_patch_size=params.temporal_patch_size,
    )
    return pixel_values, (1, new_h // params.patch_size, new_w // params.patch_size)
