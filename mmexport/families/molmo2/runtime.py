"""Molmo2's host-side logic, torch-free: crops and pooling indices (image.py), the prompt expansion of
`Molmo2Processor` (low-res then high-res token grids with column, start and end tokens; BOS first), the
image-token block ids of the decoder, and the additive merge of the image features."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import EmbeddingMerge
from .image import EncodedImage, Molmo2ImageParams, preprocess_image


def image_string(grid: Sequence[int], use_col: bool = True, single_crop_col: bool | None = None, single_crop_start: bool = True) -> str:
    """Molmo2Processor.replace_image_token for one image's (low rows, low cols, high rows, high cols)."""
    lh, lw, hh, hw = (int(g) for g in grid)
    row = "<im_patch>" * hw + ("<im_col>" if use_col else "")
    high = "<im_start>" + row * hh + "<im_end>"
    low_col = use_col if single_crop_col is None else single_crop_col
    row = "<im_patch>" * lw + ("<im_col>" if low_col else "")
    low = ("<low_res_im_start>" if single_crop_start else "<im_start>") + row * lh + "<im_end>"
    return low + high


class Molmo2Runtime(EmbeddingMerge):
    image_token = "<|image|>"

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = Molmo2ImageParams.from_dict(model_cfg["image"])
        t = model_cfg["tokens"]
        self.tokens = t
        self.image_token_id = int(t["image_patch_id"])  # the tokens the image features are added to
        self.block_ids = np.asarray(t["block_token_ids"], dtype=np.int64)
        self.bos = t.get("bos_token") or ""

    def preprocess(self, image) -> EncodedImage:
        return preprocess_image(image, self.image_params)

    def image_token_count(self, img: EncodedImage) -> int:
        return img.num_tokens

    def expand_prompt(self, text: str, images: Sequence[EncodedImage]) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise UserError(f"the prompt holds {len(parts) - 1} image placeholders for {len(images)} images")
        t = self.tokens
        out = parts[0] + "".join(image_string(im.grid, bool(t["image_use_col_tokens"]), t.get("use_single_crop_col_tokens"),
                                              bool(t["use_single_crop_start_token"])) + rest for im, rest in zip(images, parts[1:]))
        return out if out.startswith(self.bos) else self.bos + out

    def vision_feeds(self, img: EncodedImage) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32)}

    def vision_limits(self, spec, img: EncodedImage) -> str:
        d = spec.dims["num_crops"]
        return f"this image needs {img.num_crops} crops; this build's vision encoder takes {d.min} to {d.max}"

    def projector_feeds(self, img: EncodedImage, vision_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_features": vision_outputs["image_features"], "pooled_patches_idx": img.pooling}

    def encode_image(self, pipe, img) -> dict[str, np.ndarray]:
        if not (img.pooling >= 0).any(-1).all():
            raise UserError("an image-token pooling window has no patch")  # transformers would drop that token
        return super().encode_image(pipe, img)

    def merge_embeds(self, ids: np.ndarray, text_embeds: np.ndarray, image_embeds: Sequence[np.ndarray]) -> np.ndarray:
        """Molmo2 adds the image features to the `<im_patch>` tokens' own embeddings (transformers' masked_scatter
        of `inputs_embeds[mask] + features`)."""
        out = text_embeds.copy()
        if len(image_embeds):
            where = np.flatnonzero(ids == self.image_token_id)
            flat = np.concatenate(image_embeds, axis=0)
            if len(where) != len(flat):
                raise UserError(f"{len(where)} image tokens in the prompt for {len(flat)} image embeddings")
            out[0, where] += flat.astype(out.dtype)
        return out

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[EncodedImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None], 0

    def prompt_extras(self, input_ids: np.ndarray, images: Sequence[EncodedImage]) -> dict[str, np.ndarray]:
        return {"image_block_ids": np.isin(np.asarray(input_ids), self.block_ids).astype(np.int64)[None]}

    def prefill_feeds(self, prep, state) -> dict[str, np.ndarray]:
        blocks = prep.extras.get("image_block_ids")
        if blocks is None:
            blocks = self.prompt_extras(prep.input_ids, prep.images)["image_block_ids"]
        return {**super().prefill_feeds(prep, state), "image_block_ids": np.ascontiguousarray(blocks)}

    def step_feeds(self, prep, state, start: int) -> dict[str, np.ndarray]:
        return {**super().step_feeds(prep, state, start), "image_block_ids": np.zeros((1, 1), dtype=np.int64)}

    @staticmethod
    def step_positions(start: int, count: int, delta: int) -> np.ndarray:
        return (np.arange(start, start + count, dtype=np.int64) + delta)[None]
