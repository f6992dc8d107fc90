"""The torch-free half of the fixed-size ViT families (LLaVA-1.5, PaliGemma, Gemma 3, ...; export side:
families/towers.py): every image becomes one fixed-size picture (or a few fixed-size tiles), the vision tower
runs on a batch of them, the projector gives a fixed number of tokens per picture, and those embeddings replace
the image placeholder tokens of the prompt (Method A, `runtime.methods.EmbeddingMerge`).

  FixedImageParams / preprocess_fixed   the CLIP / SigLIP / LLaVA / Gemma 3 PIL image processors of transformers 5
                                        (one pipeline: [pad to square] -> resize (fixed size or shortest edge)
                                        -> [centre crop] -> rescale -> normalize), tested against each of them
  TowerRuntime                          the pipeline hooks: one [C, H, W] picture per image (`pictures` splits
                                        an image into several tiles where a family does), all pictures of a
                                        request through the vision tower and the projector in batches of up to
                                        the graphs' declared `num_images`, 1D positions (with a family offset:
                                        PaliGemma counts from 1), and an optional `image_block_ids` decoder input
                                        (bidirectional attention within one image, Gemma 3, or over the whole
                                        prompt, PaliGemma's prefix-LM)

The manifest's "model" table (written by towers.TowerAdapter.runtime_config) holds: image (FixedImageParams),
image_token, tokens {image_token_id, ...}, tokens_per_image, positions {offset}, attention {blocks: "none" |
"image" | "prompt"}, add_special_tokens ("unless_bos" | "never"), and an optional image_sequence. A checkpoint that
ships no chat template (PaliGemma) gets its prompt format as the build's tokenizer/chat_template.jinja.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from ..runtime.imageops import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ParamsDict, center_crop, image_chw, rescale_normalize, triple,
)
from ..runtime.methods import EmbeddingMerge


@dataclass(frozen=True)
class FixedImageParams(ParamsDict):
    """The knobs of transformers' fixed-size PIL image processors (CLIPImageProcessorPil, LlavaImageProcessorPil,
    SiglipImageProcessorPil, Gemma3ImageProcessorPil). `height`/`width` > 0: resize to exactly that size;
    `shortest_edge` > 0: resize the short side to it, keeping the aspect ratio (then `crop_*` by a centre crop)."""

    height: int
    width: int
    shortest_edge: int
    do_center_crop: bool
    crop_height: int
    crop_width: int
    do_pad: bool  # LLaVA's pad to square with the mean colour, before resizing
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of every processed picture; 0 when it depends on the image (no crop after a
        shortest-edge resize), which a fixed-size tower cannot take."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if self.do_resize and self.height:
            return self.height, self.width
        return 0, 0

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, defaults: dict[str, Any]) -> "FixedImageParams":
        """From a checkpoint's preprocessor_config.json; a missing key takes `defaults` (the transformers class's
        own defaults, given by the family)."""
        if not isinstance(cfg, dict):
            raise UserError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")

        def get(key: str) -> Any:
            v = cfg.get(key)
            return defaults.get(key) if v is None else v

        size, crop = dict(get("size") or {}), dict(get("crop_size") or {})
        if isinstance(get("size"), int):
            size = {"shortest_edge": get("size")} if not defaults.get("default_to_square") else {"height": get("size"), "width": get("size")}
        if size.get("longest_edge") or size.get("max_height"):
            raise UserError(f"preprocessor size {size} is not supported (a fixed size or shortest_edge only)")
        if get("do_pan_and_scan"):
            raise UserError("Gemma 3's pan-and-scan crops are not supported (do_pan_and_scan must be false)")
        return cls(
            height=int(size.get("height", 0)), width=int(size.get("width", 0)), shortest_edge=int(size.get("shortest_edge", 0)),
            do_center_crop=bool(get("do_center_crop")), crop_height=int(crop.get("height", 0)), crop_width=int(crop.get("width", 0)),
            do_pad=bool(get("do_pad")),
            image_mean=triple(get("image_mean") if get("image_mean") is not None else OPENAI_CLIP_MEAN, "image_mean"),
            image_std=triple(get("image_std") if get("image_std") is not None else OPENAI_CLIP_STD, "image_std"),
            resample=int(get("resample") if get("resample") is not None else 3), do_resize=bool(get("do_resize") if get("do_resize") is not None else True),
            do_rescale=bool(get("do_rescale") if get("do_rescale") is not None else True),
            rescale_factor=float(get("rescale_factor") if get("rescale_factor") is not None else 1 / 255),
            do_normalize=bool(get("do_normalize") if get("do_normalize") is not None else True),
            do_convert_rgb=bool(get("do_convert_rgb") if get("do_convert_rgb") is not None else True),
        )


def pad_to_square(chw: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """LlavaImageProcessorPil.pad_to_square: centre the image on a square of the background colour."""
    c, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.zeros((c, side, side), dtype=chw.dtype)
    for i, color in enumerate(background):
        out[i] = color
    if w > h:
        start = (side - h) // 2
        out[:, start:start + h] = chw
    else:
        start = (side - w) // 2
        out[:, :, start:start + w] = chw
    return out


def shortest_edge_size(h: int, w: int, edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the short side to `edge`, the long
    side int(edge * long / short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def preprocess_fixed(image: Image.Image, p: FixedImageParams) -> np.ndarray:
    """One image -> float32 [C, H, W], as transformers' PIL processor of the family computes it."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.size[0] < 1 or image.size[1] < 1:
        raise UserError(f"image is empty ({image.size[0]}x{image.size[1]} pixels)")
    chw = image_chw(image, p.do_convert_rgb)  # uint8 CHW
    if p.do_pad:
        chw = pad_to_square(chw, [int(m * 255) for m in p.image_mean])
    if p.do_resize:
        h, w = (p.height, p.width) if p.height else shortest_edge_size(chw.shape[1], chw.shape[2], p.shortest_edge)
        hwc = np.moveaxis(chw, 0, -1)
        pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        out = np.array(pil.resize((w, h), resample=p.resample))
        chw = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
    if p.do_center_crop:
        if p.crop_height > chw.shape[1] or p.crop_width > chw.shape[2]:
            raise UserError(f"image of {chw.shape[2]}x{chw.shape[1]} pixels is smaller than the {p.crop_width}x{p.crop_height} crop")
        chw = center_crop(chw, p.crop_height, p.crop_width)
    return np.ascontiguousarray(rescale_normalize(chw, p), dtype=np.float32)


@dataclass
class TowerImage:
    """One preprocessed image: its pictures [n, C, H, W] (one, or a family's tiles) and its placeholder count."""

    pixel_values: np.ndarray
    tokens: int

    @property
    def num_pictures(self) -> int:
        return int(self.pixel_values.shape[0])


class TowerRuntime(EmbeddingMerge):
    """The pipeline hooks of a fixed-size ViT family (see the module docstring); families override `pictures`,
    `image_token_count` or the block layout where they differ."""

    params_class: Any = FixedImageParams  # the manifest "image" table's ParamsDict (LLaVA-OneVision: its anyres knobs)

    def __init__(self, model_cfg: dict[str, Any]):
        self.model_cfg = model_cfg
        self.image_params = self.params_class.from_dict(model_cfg["image"])
        self.image_token = model_cfg["image_token"]
        self.image_token_id = int(model_cfg["tokens"]["image_token_id"])
        self.tokens_per_image = int(model_cfg["tokens_per_image"])
        self.position_offset = int(model_cfg.get("positions", {}).get("offset", 0))
        self.blocks = model_cfg.get("attention", {}).get("blocks", "none")
        self.special_tokens_rule = model_cfg.get("add_special_tokens", "unless_bos")

    # -- images --------------------------------------------------------------------------------
    def pictures(self, image) -> np.ndarray:
        """(hook) The fixed-size pictures of one image, [n, C, H, W] float32 (default: one)."""
        return preprocess_fixed(image, self.image_params)[None]

    def preprocess(self, image) -> TowerImage:
        pv = self.pictures(image)
        return TowerImage(pv, self.tokens_per_image * pv.shape[0])

    def image_token_count(self, img: TowerImage) -> int:
        return img.tokens

    def vision_feeds(self, img: TowerImage) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32)}

    def reference_pixels(self, img: TowerImage) -> np.ndarray:
        return img.pixel_values

    def encode_images(self, pipe, images: Sequence[TowerImage]) -> list[np.ndarray]:
        """Every picture of the request through the vision tower and the projector, in batches of up to the
        graphs' `num_images`; per image its embeddings [tokens, hidden] in prompt order."""
        if not images:
            return []
        pixels = np.concatenate([im.pixel_values for im in images]).astype(np.float32)
        most = pipe.specs["vision_encoder"].dims["num_images"].max
        embeds = []
        for i in range(0, len(pixels), most):
            vision = pipe.runners["vision_encoder"].infer({"pixel_values": np.ascontiguousarray(pixels[i:i + most])})
            out = pipe.runners["projector"].infer(self.projector_feeds(None, vision))["image_embeds"]
            embeds.append(out)
        flat = np.concatenate(embeds)  # [pictures, tokens, hidden]
        per, start = [], 0
        for im in images:
            per.append(flat[start:start + im.num_pictures].reshape(-1, flat.shape[-1]))
            start += im.num_pictures
        return per

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return outputs

    # -- prompt --------------------------------------------------------------------------------
    def image_text(self, img: TowerImage) -> str:
        """`before` + image token x count + `after` when the manifest gives an image_sequence (Gemma 3:
        "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n"), else the token repeated."""
        seq = self.model_cfg.get("image_sequence")
        if not seq:
            return super().image_text(img)
        return seq["before"] + seq["token"] * self.image_token_count(img) + seq["after"]

    def add_special_tokens(self, text: str, special_tokens: dict[str, str]) -> bool:
        """Whether tokenizing the rendered prompt adds the tokenizer's special tokens (BOS): as transformers'
        processor.apply_chat_template decides, unless the prompt already starts with the BOS token; "never" for
        a processor that switches BOS off and writes it itself (PaliGemma)."""
        if self.special_tokens_rule == "never":
            return False
        bos = special_tokens.get("bos_token")
        return not (bos and text.startswith(bos))

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[TowerImage]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :] + self.position_offset, self.position_offset

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        return (np.arange(start, start + count, dtype=np.int64) + delta)[None, :]

    def block_ids(self, ids: np.ndarray) -> np.ndarray:
        """image_block_ids [1, S]: > 0 where tokens attend each other bidirectionally (one id per image run of
        image tokens, Gemma 3; the whole prompt, PaliGemma's prefix), 0 = causal."""
        ids = np.asarray(ids)
        if self.blocks == "prompt":
            return np.ones((1, len(ids)), dtype=np.int64)
        is_img = ids == self.image_token_id
        starts = is_img & ~np.concatenate([[False], is_img[:-1]])
        return np.where(is_img, np.cumsum(starts), 0).astype(np.int64)[None, :]

    def prefill_feeds(self, prep, state) -> dict[str, np.ndarray]:
        feeds = {"position_ids": np.ascontiguousarray(prep.position_ids, dtype=np.int64)}
        if self.blocks != "none":
            feeds["image_block_ids"] = self.block_ids(prep.input_ids)
        return feeds

    def step_feeds(self, prep, state, start: int) -> dict[str, np.ndarray]:
        feeds = {"position_ids": self.step_positions(start, 1, prep.rope_delta)}
        if self.blocks != "none":
            feeds["image_block_ids"] = np.zeros((1, 1), dtype=np.int64)  # a generated token is causal
        return feeds
