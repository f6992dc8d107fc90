"""Fuyu's host-side logic, torch-free: patches (image.py), the prompt exactly as FuyuProcessor builds it, and
plain 1D positions.

Method A without an image encoder: the `vision_encoder` component is Fuyu's one linear patch embedding
(`vision_embed_tokens`), whose outputs replace the |SPEAKER| tokens' embeddings in order; |NEWLINE| (one per
row of patches) stays an ordinary token. There is no separate projector.

FuyuProcessor's sequence for one image and a prompt (`prepare_inputs_layout`, `replace_image_token`, `__call__`):
the text is "|SPEAKER|" + prompt + "<0x04>" (beginning of answer); the |SPEAKER| placeholder becomes, per row,
cols x "|SPEAKER|" + "|NEWLINE|", then "<s>"; the text is split after that "<s>", both parts tokenized without
special tokens, and the first token of the image part dropped (the tokenizer's leading word-boundary piece).
A prompt without an image is tokenized whole, with the tokenizer's special tokens (its BOS).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import EmbeddingMerge
from .image import FuyuEncodedImage, FuyuImageParams, preprocess_fuyu

BOS_STRING = "<s>"


class FuyuRuntime(EmbeddingMerge):
    image_stages = {"vision": "vision_encoder"}

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = FuyuImageParams.from_dict(model_cfg["image"])
        tokens = model_cfg["tokens"]
        self.image_token = tokens.get("image_token", "|SPEAKER|")
        self.newline_token = tokens.get("newline_token", "|NEWLINE|")
        self.image_token_id = int(tokens["image_token_id"])

    def preprocess(self, image) -> FuyuEncodedImage:
        return preprocess_fuyu(image, self.image_params)

    def image_token_count(self, img: FuyuEncodedImage) -> int:
        return img.num_patches

    def replacement(self, img: FuyuEncodedImage) -> str:
        """FuyuProcessor.replace_image_token: each row of patches, then its newline, then BOS."""
        return (self.image_token * img.cols + self.newline_token) * img.rows + BOS_STRING

    def prompt_ids(self, prompts, text: str, images: Sequence[FuyuEncodedImage]) -> tuple[str, list[int]]:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise UserError(f"the prompt holds {len(parts) - 1} image placeholders for {len(images)} images")
        if not images:
            return text, prompts.encode(text, add_special_tokens=True)
        text = parts[0] + "".join(self.replacement(im) + rest for im, rest in zip(images, parts[1:]))
        cut = text.find(BOS_STRING)
        if cut < 0:
            return text, prompts.encode(text)
        cut += len(BOS_STRING)
        return text, prompts.encode(text[:cut])[1:] + prompts.encode(text[cut:])

    def vision_feeds(self, img: FuyuEncodedImage) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32)}

    def encode_image(self, pipe, img: FuyuEncodedImage) -> dict[str, np.ndarray]:
        return pipe.runners["vision_encoder"].infer(self.vision_feeds(img))

    def vision_limits(self, spec, img: FuyuEncodedImage) -> str:
        p = self.image_params
        return (f"it makes {img.num_patches} patches of {p.patch_width}x{p.patch_height}, but this build's vision encoder "
                f"takes {spec.dims['num_patches'].min}-{spec.dims['num_patches'].max}")

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[FuyuEncodedImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    @staticmethod
    def step_positions(start: int, count: int, delta: int) -> np.ndarray:
        return (np.arange(start, start + count, dtype=np.int64) + delta)[None, :]
