"""Emu3's host-side logic, torch-free: preprocessing (image.py), the prompt exactly as Emu3Processor builds it,
the VQ codes -> vocabulary tokens mapping, and plain 1D positions.

Emu3Processor (`prepare_inputs_layout`, `replace_image_token`): BOS + the text; each `<image>` becomes
  <|image start|>{h}*{w}<|image token|> + h*(w+1) x <image> + <|extra_201|><|image end|>
with h, w the resized image's sides / 8; the whole text is tokenized with the tokenizer's special tokens.
The model then replaces the h*(w+1) placeholders by the embeddings of the image's codes mapped to their
`<|visual tokenNNNNNN|>` ids, each row of w codes followed by the end-of-line token <|extra_200|>
(`Emu3ImageVocabularyMapping.convert_img2bpe`). Here the `vision_encoder` graph returns the codes (the VQ
encoder, quant_conv and the nearest-codebook argmin), the host maps them to token ids, and the
`embed_tokens` graph embeds them: those are the image embeddings merged at the placeholders.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import UserError
from ...runtime.methods import EmbeddingMerge
from .image import Emu3EncodedImage, Emu3ImageParams, preprocess_emu3


class Emu3Runtime(EmbeddingMerge):
    image_stages = {"vision": "vision_encoder"}

    def __init__(self, model_cfg: dict[str, Any]):
        self.image_params = Emu3ImageParams.from_dict(model_cfg["image"])
        t = model_cfg["tokens"]
        self.image_token = t["image_token"]
        self.image_token_id = int(t["image_token_id"])
        self.bos, self.boi, self.eoi, self.wrapper, self.eof = t["bos_token"], t["boi_token"], t["eoi_token"], t["image_wrapper_token"], t["eof_token"]
        self.eol_token_id = int(t["eol_token_id"])
        self.downsample = int(model_cfg["vision"]["downsample_ratio"])  # Emu3Processor's (8)
        self.vq_factor = int(model_cfg["vision"]["spatial_factor"])  # the VQ-VAE's
        vt = model_cfg["vision"]["visual_token_ids"]
        self.code_to_token = (np.arange(vt["start"], vt["start"] + vt["count"], dtype=np.int64) if isinstance(vt, dict)
                              else np.asarray(vt, dtype=np.int64))

    def preprocess(self, image) -> Emu3EncodedImage:
        return preprocess_emu3(image, self.image_params)

    def grid(self, img: Emu3EncodedImage) -> tuple[int, int]:
        h, w = img.size
        return h // self.downsample, w // self.downsample

    def image_token_count(self, img: Emu3EncodedImage) -> int:
        h, w = self.grid(img)
        return h * (w + 1)

    def image_text(self, img: Emu3EncodedImage) -> str:
        """Emu3Processor's image string: boi, "h*w", the wrapper, h rows of w visual tokens + end-of-line, eof, eoi."""
        h, w = self.grid(img)
        return f"{self.boi}{h}*{w}{self.wrapper}{self.image_token * (h * (w + 1))}{self.eof}{self.eoi}"

    def prompt_text(self, text: str) -> str:
        return self.bos + text  # Emu3Processor prepends the BOS string, and its tokenizer call adds special tokens too

    def add_special_tokens(self, text: str, special_tokens: dict[str, str]) -> bool:
        return True

    def vision_feeds(self, img: Emu3EncodedImage, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The VQ encoder's input: the image, zero-padded bottom / right to `size` (see `encode_images`)."""
        pv = img.pixel_values
        if size is not None and size != img.size:
            pv = np.pad(pv, ((0, 0), (0, size[0] - img.size[0]), (0, size[1] - img.size[1])))
        return {"pixel_values": np.ascontiguousarray(pv[None], dtype=np.float32)}

    def image_codes(self, img: Emu3EncodedImage, size: tuple[int, int], codes: np.ndarray) -> np.ndarray:
        """The image's own codes [h*w] out of the VQ encoder's codes for its input padded to `size`
        (Emu3VQVAE.encode crops them the same way)."""
        f = self.vq_factor
        grid = codes.reshape(size[0] // f, size[1] // f)
        return np.ascontiguousarray(grid[: img.size[0] // f, : img.size[1] // f]).reshape(-1)

    def image_token_ids(self, img: Emu3EncodedImage, codes: np.ndarray) -> np.ndarray:
        """The image's VQ codes [h*w] (raster order) as vocabulary ids, each row followed by the end-of-line token:
        [h*(w+1)] (Emu3ImageVocabularyMapping.convert_img2bpe)."""
        h, w = img.size[0] // self.vq_factor, img.size[1] // self.vq_factor
        if codes.size != h * w or codes.min() < 0 or codes.max() >= len(self.code_to_token):
            raise UserError(f"the VQ encoder returned {codes.size} codes for a {h}x{w} latent grid")
        ids = self.code_to_token[codes.reshape(h, w)]
        return np.concatenate([ids, np.full((h, 1), self.eol_token_id, dtype=np.int64)], axis=1).reshape(-1)

    def encode_image(self, pipe, img: Emu3EncodedImage, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        size = size or img.size
        out = pipe.runners["vision_encoder"].infer(self.vision_feeds(img, size))
        ids = self.image_token_ids(img, self.image_codes(img, size, out["codes"]))
        return {"image_embeds": pipe.embed(ids)[0], "image_token_ids": ids}

    def encode_images(self, pipe, images: Sequence[Emu3EncodedImage]) -> list[np.ndarray]:
        """Emu3ImageProcessor pads a prompt's images with zeros to the largest height and width among them, and
        the VQ encoder sees that padding (its convolutions and attention reach into it), so each image is
        encoded padded to that size, as transformers does, and its codes cropped."""
        if not images:
            return []
        size = (max(im.size[0] for im in images), max(im.size[1] for im in images))
        return [self.encode_image(pipe, im, size)["image_embeds"] for im in images]

    def vision_limits(self, spec, img: Emu3EncodedImage) -> str:
        p = self.image_params
        return (f"Emu3's resizing makes it {img.size[1]}x{img.size[0]} pixels; this build's VQ encoder takes sides of "
                f"{spec.dims['height'].min}-{spec.dims['height'].max} pixels ({p.min_pixels}-{p.max_pixels} pixels in all): "
                "aspect ratios up to 16:1 always fit, crop or pad the image")

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[Emu3EncodedImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    @staticmethod
    def step_positions(start: int, count: int, delta: int) -> np.ndarray:
        return (np.arange(start, start + count, dtype=np.int64) + delta)[None, :]
