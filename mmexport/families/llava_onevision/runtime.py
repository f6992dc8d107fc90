"""LLaVA-OneVision's host side, torch-free, on the shared tower runtime (families/towers_runtime.TowerRuntime):

  preprocess_images   one image in the prompt -> anyres tiles + a base view; several -> one padded view each
                      (image.preprocess_onevision, as LlavaOnevisionImageProcessorPil)
  image_token_count   LlavaOnevisionProcessor's count for the image's size (image.image_token_count)
  encode_images       every view of the request through vision_encoder + projector in batches (TowerRuntime),
                      then each image's views packed as LlavaOnevisionModel.pack_image_features does: the base
                      view, the tiles' map unpadded (and shrunk past anyres_max_N), an image_newline after each row
                      (image.pack_tables: a weighted gather over the projected rows + the newline row, which the
                      manifest carries)
  positions           plain 1D (Qwen2 decoder)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..towers_runtime import TowerRuntime
from .image import OnevisionImage, OnevisionImageParams, image_token_count, pack_tables, preprocess_onevision


@dataclass
class OnevisionEncoded(OnevisionImage):
    tokens: int = 0  # its image tokens in the prompt

    @property
    def num_pictures(self) -> int:
        return self.num_views


class OnevisionRuntime(TowerRuntime):
    params_class = OnevisionImageParams

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        ov = model_cfg["onevision"]
        self.side = int(ov["side"])  # patches per view side
        self.num_image_tokens = self.side * self.side
        self.aspect = str(ov["vision_aspect_ratio"])
        self.newline = np.asarray(ov["image_newline"], dtype=np.float32)  # [hidden]

    def preprocess(self, image, multi_image: bool = False) -> OnevisionEncoded:
        enc = preprocess_onevision(image, self.image_params, multi_image)
        n = image_token_count(enc.image_size, self.image_params, self.num_image_tokens, self.aspect, multi_image)
        return OnevisionEncoded(enc.pixel_values, enc.image_size, enc.grid, n)

    def preprocess_images(self, images: Sequence[Any]) -> list[OnevisionEncoded]:
        """As the processor treats a prompt's images (apply_chat_template passes them as one sample): one image
        is cut into anyres tiles, two or more become one view each."""
        return [self.preprocess(im, multi_image=len(images) > 1) for im in images]

    def image_token_count(self, img: OnevisionEncoded) -> int:
        return img.tokens

    def pack(self, img: OnevisionEncoded, view_embeds: np.ndarray) -> np.ndarray:
        """[views, P, hidden] (or [views * P, hidden]) projected features -> the image's [tokens, hidden] embeddings."""
        rows = view_embeds.reshape(-1, view_embeds.shape[-1]).astype(np.float32)
        rows = np.concatenate([rows, self.newline[None].astype(np.float32)])
        idx, w = pack_tables(img, self.side, self.aspect)
        if not w[:, 1:].any():  # no bilinear shrink: a plain gather
            return rows[idx[:, 0]]
        return np.einsum("tkh,tk->th", rows[idx], w, dtype=np.float32)

    def encode_images(self, pipe, images: Sequence[OnevisionEncoded]) -> list[np.ndarray]:
        return [self.pack(im, e) for im, e in zip(images, super().encode_images(pipe, images))]

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """verify compares the packed image (transformers' get_image_features) with the projector's views packed."""
        return {**outputs, "image_embeds": self.pack(img, outputs["image_embeds"])}
