"""InternVL host-side logic, torch-free: dynamic tiling (image.py) and InternVLProcessor's prompt expansion (each
`<IMG_CONTEXT>` of the chat template becomes `<img>` + image_seq_length * tiles `<IMG_CONTEXT>` + `</img>`).
Method A over a batch of tiles per image, 1D positions (runtime.methods.TileBatchMerge)."""
from __future__ import annotations

from typing import Any

from ...runtime.methods import TileBatchMerge, TiledImage
from .image import InternVLImageParams, preprocess_internvl


class InternVLRuntime(TileBatchMerge):
    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = InternVLImageParams.from_dict(model_cfg["image"])
        self.image_token_id = int(model_cfg["tokens"]["image_token_id"])
        self.image_token = model_cfg.get("image_token", "<IMG_CONTEXT>")
        self.start_token = model_cfg.get("start_image_token", "<img>")
        self.end_token = model_cfg.get("end_image_token", "</img>")
        self.tokens_per_tile = int(model_cfg["vision"]["image_seq_length"])

    def preprocess(self, image) -> TiledImage:
        tiles, (cols, rows) = preprocess_internvl(image, self.image_params)
        return TiledImage(tiles, rows, cols)

    def image_text(self, img: TiledImage) -> str:
        return f"{self.start_token}{self.image_token * self.image_token_count(img)}{self.end_token}"
