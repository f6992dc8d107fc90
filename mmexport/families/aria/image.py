"""Aria's image processor, torch-free: transformers' AriaImageProcessorPil re-implemented with
runtime/imageops.py (tested equal to it on odd sizes).

Each image becomes one crop (or, with `split_image`, the crops of the best-fitting grid of
`split_resolutions`, as LLaVA-NeXT picks it: aspect-preserving resize, centred padding, crops of
max_image_size); each crop is resized so its long side is max_image_size (the short side at least
min_image_size), padded bottom/right with zeros to max_image_size x max_image_size, and a pixel mask marks
the resized content. The vision tower sees the mask per patch (a patch is real when any of its pixels is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime import imageops

# AriaImageProcessorPil's default grid: (rows, cols) in units of 490 pixels
DEFAULT_SPLITS = [(1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2), (2, 1), (3, 1), (3, 2),
                  (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1)]


@dataclass(frozen=True)
class AriaImageParams(imageops.ParamsDict):
    max_image_size: int = 980
    min_image_size: int = 336
    split_image: bool = False
    split_resolutions: tuple = tuple((r * 490, c * 490) for r, c in DEFAULT_SPLITS)
    image_mean: tuple[float, float, float] = imageops.IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = imageops.IMAGENET_STANDARD_STD
    resample: int = 3  # PIL bicubic
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    optional = imageops.ParamsDict.optional + ("split_image", "split_resolutions", "min_image_size")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["split_resolutions"] = [list(r) for r in self.split_resolutions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AriaImageParams":
        p = super().from_dict({k: v for k, v in d.items() if k != "split_resolutions"})
        if d.get("split_resolutions") is not None:
            object.__setattr__(p, "split_resolutions", tuple((int(h), int(w)) for h, w in d["split_resolutions"]))
        if p.max_image_size not in (490, 980):
            raise UserError(f"Aria's max_image_size must be 490 or 980, got {p.max_image_size}")
        return p

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> "AriaImageParams":
        keys = {f for f in cls.__dataclass_fields__}
        return cls.from_dict({k: v for k, v in cfg.items() if k in keys and v is not None})

    @property
    def max_crops(self) -> int:
        s = self.max_image_size
        if not self.split_image:
            return 1
        return max(math.ceil(h / s) * math.ceil(w / s) for h, w in self.split_resolutions)


def select_best_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: the most effective pixels, then the least waste."""
    oh, ow = size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in resolutions:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best  # type: ignore[return-value]


def patch_output_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers.image_processing_utils.get_patch_output_size."""
    oh, ow = size
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def _resize(chw: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """A uint8 CHW array resized by Pillow (transformers' PIL backend round trip)."""
    if chw.shape[1:] == (height, width):
        return chw
    return np.moveaxis(np.array(Image.fromarray(np.moveaxis(chw, 0, -1)).resize((width, height), resample=resample)), -1, 0)


@dataclass
class AriaEncodedImage:
    pixel_values: np.ndarray  # [crops, 3, S, S] float32
    pixel_mask: np.ndarray  # [crops, S, S] bool

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])


def crops_of(image: Image.Image, p: AriaImageParams) -> list[np.ndarray]:
    """The uint8 CHW crops an image is cut into (one without split_image)."""
    chw = imageops.image_chw(image, p.do_convert_rgb)
    if not p.split_image:
        return [chw]
    h, w = chw.shape[1:]
    target = select_best_resolution((h, w), p.split_resolutions)
    nh, nw = patch_output_size((h, w), target)
    padded = imageops.pad(_resize(chw, nh, nw, p.resample), target[0], target[1], 0, center=True)
    s = p.max_image_size
    return [padded[:, i:i + s, j:j + s] for i in range(0, target[0], s) for j in range(0, target[1], s)]


def preprocess_aria(image: Image.Image, p: AriaImageParams) -> AriaEncodedImage:
    s = p.max_image_size
    pixels, masks = [], []
    for crop in crops_of(image, p):
        h, w = crop.shape[1:]
        scale = s / max(h, w)
        if w >= h:
            nh, nw = max(int(h * scale), p.min_image_size), s
        else:
            nh, nw = s, max(int(w * scale), p.min_image_size)
        resized = imageops.pad(_resize(crop, nh, nw, p.resample), s, s, 0)
        mask = np.zeros((s, s), dtype=bool)
        mask[:nh, :nw] = True
        pixels.append(imageops.rescale_normalize(resized, p).astype(np.float32))
        masks.append(mask)
    return AriaEncodedImage(np.stack(pixels), np.stack(masks))


def patch_mask(pixel_mask: np.ndarray, patch: int) -> np.ndarray:
    """[crops, S, S] pixel mask -> [crops, S/patch, S/patch]: a patch is real when any of its pixels is
    (AriaModel._create_patch_attention_mask)."""
    c, h, w = pixel_mask.shape
    return pixel_mask.reshape(c, h // patch, patch, w // patch, patch).any(axis=(2, 4))


def patch_position_ids(mask: np.ndarray, per_side: int) -> np.ndarray:
    """[crops, gh, gw] patch mask -> [crops, gh*gw] int64 position-embedding rows (Idefics3VisionEmbeddings):
    the real patches' fractional coordinates bucketed into the per_side x per_side table, 0 for padding."""
    crops, gh, gw = mask.shape
    # torch.arange(1/n, 1.0, 1/n) in float32 computes start + i*step in double, then rounds
    boundaries = (1.0 / per_side + np.arange(per_side - 1, dtype=np.float64) * (1.0 / per_side)).astype(np.float32)
    out = np.zeros((crops, gh * gw), dtype=np.int64)
    for c in range(crops):
        nh, nw = int(mask[c, :, 0].sum()), int(mask[c, 0, :].sum())
        fh = np.minimum(np.arange(gh, dtype=np.float32) * (np.float32(1.0) / np.float32(max(nh, 1))), np.float32(1.0 - 1e-6))
        fw = np.minimum(np.arange(gw, dtype=np.float32) * (np.float32(1.0) / np.float32(max(nw, 1))), np.float32(1.0 - 1e-6))
        bh = np.searchsorted(boundaries, fh, side="right")
        bw = np.searchsorted(boundaries, fw, side="right")
        ids = (bh[:, None] * per_side + bw[None, :]).reshape(-1)
        out[c] = np.where(mask[c].reshape(-1), ids, 0)
    return out
