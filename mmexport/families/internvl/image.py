"""InternVL image preprocessing, torch-free: transformers' `GotOcr2ImageProcessorPil` with crop_to_patches (what
InternVLProcessor asks for), re-implemented with mmexport.runtime.imageops for one image:

1. convert to RGB, compositing any transparency onto white;
2. choose the tile grid (cols, rows) with min_patches <= cols*rows <= max_patches whose aspect ratio is closest to
   the image's (`imageops.best_tile_grid`, = transformers' get_optimal_tiled_canvas);
3. resize (uint8, Pillow, BICUBIC by default) to cols*S x rows*S and crop it into the tiles (row-major); with more
   than one tile, add the original image resized to one tile (the thumbnail) last;
4. rescale (`uint8 -> float64 * rescale_factor -> float32`), normalize in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ParamsDict, best_tile_grid, rescale_normalize,
                                 tiles_with_global, to_rgb, triple)

_DEFAULT_RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class InternVLImageParams(ParamsDict):
    tile: int  # size: the vision encoder's square input
    min_patches: int
    max_patches: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = _DEFAULT_RESAMPLE
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> "InternVLImageParams":
        size = cfg.get("size") or {"height": 384, "width": 384}
        if size.get("height") != size.get("width") or not size.get("height"):
            raise UserError(f"preprocessor_config.json: size {size} is not a square tile")

        def get(key: str, default: Any) -> Any:
            v = cfg.get(key)
            return default if v is None else v

        return cls(
            tile=int(size["height"]), min_patches=int(get("min_patches", 1)), max_patches=int(get("max_patches", 12)),
            image_mean=triple(get("image_mean", IMAGENET_DEFAULT_MEAN), "image_mean"),
            image_std=triple(get("image_std", IMAGENET_DEFAULT_STD), "image_std"),
            resample=int(get("resample", _DEFAULT_RESAMPLE)), do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)), do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )

    def max_tiles(self) -> int:
        return self.max_patches + 1 if self.max_patches > 1 else 1


def preprocess_internvl(image: Image.Image, p: InternVLImageParams) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (tiles float32 [n, 3, S, S], (cols, rows)); n = cols*rows, plus the thumbnail when that is > 1."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.size[0] < 1 or image.size[1] < 1:
        raise UserError(f"image is empty ({image.size[0]}x{image.size[1]} pixels)")
    if p.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise UserError(f"image mode {image.mode} needs do_convert_rgb")
    w, h = image.size
    if p.max_patches > 1:
        cols, rows = best_tile_grid(h, w, p.tile, p.tile, p.min_patches, p.max_patches)
    else:
        cols = rows = 1
    grid = image.resize((cols * p.tile, rows * p.tile), resample=p.resample)
    tiles = tiles_with_global(grid, rows, cols, p.tile, image, p.resample)
    return np.stack([rescale_normalize(t, p) for t in tiles]).astype(np.float32), (cols, rows)
