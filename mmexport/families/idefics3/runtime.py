"""Idefics3 / SmolVLM host-side logic, torch-free: tiles + global view (image.py) and the processors' prompt
expansion (`<fake_token_around_image>`, `<row_r_col_c>`, `<global-img>` around each tile's image tokens).
Method A over a batch of tiles per image, 1D positions (runtime.methods.TileBatchMerge)."""
from __future__ import annotations

from typing import Any

from ...runtime.methods import TileBatchMerge, TiledImage
from .image import Idefics3ImageParams, image_prompt, preprocess_idefics3


class Idefics3Runtime(TileBatchMerge):
    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = Idefics3ImageParams.from_dict(model_cfg["image"])
        self.image_token_id = int(model_cfg["tokens"]["image_token_id"])
        self.image_token = model_cfg.get("image_token", "<image>")
        self.fake_token = model_cfg.get("fake_image_token", "<fake_token_around_image>")
        self.global_token = model_cfg.get("global_image_token", "<global-img>")
        self.tokens_per_tile = int(model_cfg["vision"]["image_seq_len"])

    def preprocess(self, image) -> TiledImage:
        return TiledImage(*preprocess_idefics3(image, self.image_params))

    def image_text(self, img: TiledImage) -> str:
        return image_prompt(img.rows, img.cols, self.tokens_per_tile, self.image_token, self.fake_token, self.global_token)
