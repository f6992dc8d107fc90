"""Idefics3 / SmolVLM image preprocessing, torch-free (numpy + Pillow), composed from mmexport.runtime.imageops.

A step-for-step re-implementation of transformers' PIL-backend processors `Idefics3ImageProcessorPil` and
`SmolVLMImageProcessorPil` (transformers 5.x; the two are the same code), for one image:

1. convert to RGB, compositing any transparency onto white;
2. resize (uint8, Pillow, LANCZOS by default) so the longest edge is `size["longest_edge"]` -- up or down --
   the other side `int(longest / aspect)` rounded up to even, then capped at 4096 on the longest edge;
3. with `do_image_splitting`: resize again so both sides are whole multiples of the tile
   (`max_image_size["longest_edge"]`), crop that into rows x cols tiles (row-major) and add the whole image
   resized to one tile as the global view; an image that is one tile stays one tile (rows = cols = 0).
   Without splitting: the image resized to one square tile;
4. rescale (`uint8 -> float64 * rescale_factor -> float32`), normalize in float32.

Every tile is a full square, so transformers' pixel_attention_mask is all ones for a real image (the padding it
marks is whole padding images of a batch, which the model drops) and the exported vision graph needs no mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import UserError
from ...runtime.imageops import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ParamsDict, rescale_normalize, tiles_with_global, to_rgb, triple

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the longest edge
_DEFAULT_RESAMPLE = 1  # PIL.Image.Resampling.LANCZOS


@dataclass(frozen=True)
class Idefics3ImageParams(ParamsDict):
    longest_edge: int  # size["longest_edge"]: the first resize
    tile: int  # max_image_size["longest_edge"]: the vision encoder's square input
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = _DEFAULT_RESAMPLE
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> "Idefics3ImageParams":
        size, tile = cfg.get("size") or {"longest_edge": 4 * 364}, cfg.get("max_image_size") or {"longest_edge": 364}
        if "longest_edge" not in size or "longest_edge" not in tile:
            raise UserError("preprocessor_config.json: size and max_image_size must give longest_edge")

        def get(key: str, default: Any) -> Any:
            v = cfg.get(key)
            return default if v is None else v

        return cls(
            longest_edge=int(size["longest_edge"]), tile=int(tile["longest_edge"]),
            image_mean=triple(get("image_mean", IMAGENET_STANDARD_MEAN), "image_mean"),
            image_std=triple(get("image_std", IMAGENET_STANDARD_STD), "image_std"),
            do_resize=bool(get("do_resize", True)), do_image_splitting=bool(get("do_image_splitting", True)),
            resample=int(get("resample", _DEFAULT_RESAMPLE)), do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)), do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )

    def max_grid(self) -> int:
        """The most tiles along one side (the longest edge after both resizes, in tiles)."""
        longest = min(self.longest_edge, MAX_IMAGE_SIZE) if self.do_resize else MAX_IMAGE_SIZE
        return max(1, math.ceil(longest / self.tile))

    def max_tiles(self) -> int:
        """The most tiles one image becomes (grid + the global view)."""
        g = self.max_grid()
        return g * g + 1 if self.do_image_splitting and g > 1 else 1


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size: the longest edge to `longest` (up or down), the other side
    int()-truncated and made even, both at least 1; then scaled below MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def whole_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both sides up to whole tiles, keeping the aspect as it does."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def preprocess_idefics3(image: Image.Image, p: Idefics3ImageParams) -> tuple[np.ndarray, int, int]:
    """One image -> (tiles float32 [n, 3, tile, tile], rows, cols); rows = cols = 0 when the image is one tile
    (no global view then), else n = rows * cols + 1 (the global view last)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.size[0] < 1 or image.size[1] < 1:
        raise UserError(f"image is empty ({image.size[0]}x{image.size[1]} pixels)")
    if p.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise UserError(f"image mode {image.mode} needs do_convert_rgb")
    w, h = image.size
    if p.do_resize:
        h, w = longest_edge_size(h, w, p.longest_edge)
        image = image.resize((w, h), resample=p.resample)
    rows = cols = 0
    if p.do_image_splitting:
        h, w = whole_tiles_size(h, w, p.tile)
        image = image.resize((w, h), resample=p.resample)
        if h > p.tile or w > p.tile:
            rows, cols = h // p.tile, w // p.tile
            tiles = tiles_with_global(image, rows, cols, p.tile, image, p.resample)
        else:
            tiles = np.moveaxis(np.array(image), -1, 0)[None]
    else:
        tiles = np.moveaxis(np.array(image.resize((p.tile, p.tile), resample=p.resample)), -1, 0)[None]
    out = np.stack([rescale_normalize(t, p) for t in tiles]).astype(np.float32)
    return out, rows, cols


def image_prompt(rows: int, cols: int, seq_len: int, image_token: str = "<image>",
                 fake_token: str = "<fake_token_around_image>", global_token: str = "<global-img>") -> str:
    """What Idefics3Processor / SmolVLMProcessor put in place of one `<image>`: per tile
    `<fake_token_around_image><row_r_col_c>` + seq_len image tokens, a newline after each row, then a blank line and
    the global view `<fake_token_around_image><global-img>` + seq_len image tokens + `<fake_token_around_image>`
    (the global view alone for a one-tile image)."""
    glob = f"{fake_token}{global_token}{image_token * seq_len}{fake_token}"
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{fake_token}<row_{r + 1}_col_{c + 1}>{image_token * seq_len}"
        text += "\n"
    return text + "\n" + glob
