"""The two ways a multimodal LLM feeds images to its decoder, as runtime strategies (torch-free).

A family runtime (mmexport/families/*/runtime.py) inherits one of them and adds its own
preprocessing and positions; the generic pipeline (pipeline.py) only calls these hooks:

  encode_images(pipe, images)          -> vision state    once per request, before prefill
  prompt_embeds(pipe, prep, state)     -> [1, S, hidden]  the prompt's decoder input
  prefill_feeds(prep, state)           -> extra decoder inputs for the prompt
  step_feeds(prep, state, start)       -> extra decoder inputs for one generated token at `start`
  request_inputs(state)                -> the part of those fixed for the request (kept per slot when batching)

Method A (EmbeddingMerge: Qwen2-VL, LLaVA, SmolVLM): vision encoder -> projector -> image embeddings
written over the image placeholder tokens; the decoder is a plain LLM.

Method B (CrossAttention: Llama 3.2 Vision / mllama): vision encoder -> projector -> the keys/values of
every cross-attention layer, computed once (`cross_kv`) and fed unchanged to every decoder step; the
prompt keeps one `<|image|>` token per image and a per-token, per-tile cross-attention mask says which
image tiles each text token may attend to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UserError


class FamilyRuntime:
    """What every family runtime provides (see the module docstring for the decoding hooks)."""

    image_token: str
    image_token_id: int
    # time-to-first-token stages of the image path -> the component whose runner time they are
    image_stages: dict[str, str] = {"vision": "vision_encoder", "projector": "projector"}

    def preprocess(self, image) -> Any:
        raise NotImplementedError

    def preprocess_images(self, images: Sequence[Any]) -> list[Any]:
        """All images of one prompt (PIL images, in order). By default each on its own; a family whose processor
        treats an image differently when the prompt holds others (LLaVA-OneVision: one image is cut into anyres
        tiles, several become one view each) overrides this."""
        return [self.preprocess(im) for im in images]

    def image_token_count(self, img) -> int:
        """How many placeholder tokens one image takes in the prompt."""
        return 1

    def image_text(self, img) -> str:
        """What one image's placeholder becomes in the prompt text (transformers' `replace_image_token`; default:
        the placeholder repeated `image_token_count` times)."""
        return self.image_token * self.image_token_count(img)

    def prompt_text(self, text: str) -> str:
        """The rendered prompt before placeholder expansion (a processor that prepends a system prompt does it here)."""
        return text

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[Any]) -> tuple[np.ndarray, int]:
        """Decoder position ids for the prompt and the offset that decode steps add."""
        raise NotImplementedError

    def expand_prompt(self, text: str, images: Sequence[Any]) -> str:
        """The rendered prompt with each image placeholder expanded as the family's processor does (default:
        `prompt_text`, then each placeholder replaced by `image_text`; a family whose processor rewrites the prompt
        more than that overrides it). The pipeline then tokenizes it, with `add_special_tokens`."""
        from .prompt import PromptBuilder

        text = self.prompt_text(text)
        if not images and self.image_token not in text:
            return text
        return PromptBuilder.replace_placeholders(text, self.image_token, [self.image_text(e) for e in images])

    def prompt_ids(self, prompts, text: str, images: Sequence[Any]) -> tuple[str, list[int]]:
        """The rendered prompt with its placeholders expanded, and its token ids (`prompts`: the runtime's
        PromptBuilder): `expand_prompt`, then tokenized with `add_special_tokens`. The pipeline calls only this; a
        family whose processor edits the token sequence itself (Fuyu drops a word-boundary piece) overrides it."""
        text = self.expand_prompt(text, images)
        return text, prompts.encode(text, add_special_tokens=self.add_special_tokens(text, prompts.special_tokens))

    def prompt_extras(self, input_ids: np.ndarray, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Further per-prompt arrays the decoder needs (Method B: the cross-attention mask)."""
        return {}

    def add_special_tokens(self, text: str, special_tokens: dict[str, str]) -> bool:
        """Whether tokenizing the rendered prompt adds the tokenizer's own special tokens (e.g. a BOS its
        post-processor inserts); by default no: the chat template writes them."""
        return False

    def request_inputs(self, state) -> dict[str, np.ndarray]:
        """Decoder inputs fixed for the whole request (Method B: the cross K/V), part of every step's feeds;
        a batching runtime keeps them per slot instead of gathering them each step."""
        return {}


class EmbeddingMerge(FamilyRuntime):
    """Method A: image embeddings replace the image placeholder tokens' embeddings."""

    def vision_feeds(self, img) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode_image(self, pipe, img) -> dict[str, np.ndarray]:
        """The projector's outputs for one preprocessed image (`image_embeds` [tokens, hidden], in prompt order)."""
        vision = pipe.runners["vision_encoder"].infer(self.vision_feeds(img))
        return self.projector_outputs_in_reference_order(img, pipe.runners["projector"].infer(self.projector_feeds(img, vision)))

    def encode_images(self, pipe, images: Sequence[Any]) -> list[np.ndarray]:
        return [self.encode_image(pipe, im)["image_embeds"] for im in images]

    # how the graphs' layouts relate to transformers' (identity unless a family reorders or pads)
    def reference_pixels(self, img) -> np.ndarray:
        """The image's pixels laid out as transformers' processor lays them out (verify compares them)."""
        return img.pixel_values

    def projector_feeds(self, img, vision_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The projector's feed from the vision encoder's outputs (by name, plus any host-side inputs)."""
        return {"vision_hidden": vision_outputs["vision_hidden"]}

    def vision_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return outputs

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return outputs

    def merge_embeds(self, ids: np.ndarray, text_embeds: np.ndarray, image_embeds: Sequence[np.ndarray]) -> np.ndarray:
        """Put the image embeddings at the image-token positions, in order."""
        out = text_embeds.copy()
        if len(image_embeds):
            where = np.flatnonzero(ids == self.image_token_id)
            flat = np.concatenate(image_embeds, axis=0)
            if len(where) != len(flat):
                raise UserError(f"{len(where)} image tokens in the prompt for {len(flat)} image embeddings")
            out[0, where] = flat.astype(out.dtype)
        return out

    def prompt_embeds(self, pipe, prep, state: list[np.ndarray]) -> np.ndarray:
        return self.merge_embeds(prep.input_ids, pipe.embed(prep.input_ids), state)

    def prefill_feeds(self, prep, state) -> dict[str, np.ndarray]:
        return {"position_ids": np.ascontiguousarray(prep.position_ids, dtype=np.int64)}

    def step_feeds(self, prep, state, start: int) -> dict[str, np.ndarray]:
        return {"position_ids": self.step_positions(start, 1, prep.rope_delta)}

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        raise NotImplementedError


@dataclass
class CrossState:
    """Method B's per-request vision state: every cross-attention layer's keys/values (computed once)."""

    feeds: dict[str, np.ndarray]  # cross_key_j / cross_value_j [1, kv, tiles, P, D]
    tiles: int  # tile slots attended (images x max_tiles); 1 zero slot when there is no image
    has_image: bool


class CrossAttention(FamilyRuntime):
    """Method B: the decoder's cross-attention layers read keys/values computed once from the images."""

    image_stages = {"vision": "vision_encoder", "projector": "projector", "cross_kv": "cross_kv"}
    cross_layers: Sequence[int] = ()
    max_tiles: int = 1

    def vision_feeds(self, img) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def image_states(self, pipe, img) -> np.ndarray:
        """Projected states [max_tiles, P, hidden] for one preprocessed image."""
        feats = pipe.runners["vision_encoder"].infer(self.vision_feeds(img))["vision_hidden"]
        return pipe.runners["projector"].infer({"vision_hidden": feats})["image_states"]

    def cross_kv(self, pipe, states: np.ndarray) -> dict[str, np.ndarray]:
        return pipe.runners["cross_kv"].infer({"cross_states": np.ascontiguousarray(states)})

    def encode_images(self, pipe, images: Sequence[Any]) -> CrossState:
        if not images:
            # text-only: the decoder skips its cross-attention layers (has_image = 0); the cross inputs
            # still need a shape, so one zero tile slot stands in (never read)
            spec = pipe.specs["decoder"]
            feeds = {}
            for t in spec.inputs:
                if t.name.startswith("cross_key_") or t.name.startswith("cross_value_"):
                    shape = tuple(1 if isinstance(d, str) else d for d in t.shape)
                    feeds[t.name] = np.zeros(shape, dtype=t.dtype)
            return CrossState(feeds, 1, False)
        states = np.concatenate([self.image_states(pipe, im) for im in images], axis=0)
        return CrossState(self.cross_kv(pipe, states), int(states.shape[0]), True)

    def prompt_embeds(self, pipe, prep, state: CrossState) -> np.ndarray:
        return pipe.embed(prep.input_ids)

    def request_inputs(self, state: CrossState) -> dict[str, np.ndarray]:
        return state.feeds

    def _feeds(self, state: CrossState, positions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "position_ids": positions,
            "cross_attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
            "has_image": np.asarray([1 if state.has_image else 0], dtype=np.int64),
            **state.feeds,
        }

    def prefill_feeds(self, prep, state: CrossState) -> dict[str, np.ndarray]:
        return self._feeds(state, np.ascontiguousarray(prep.position_ids, dtype=np.int64), self._mask(prep, state)[None])

    def step_feeds(self, prep, state: CrossState, start: int) -> dict[str, np.ndarray]:
        # a generated token sees what the prompt's last token sees (transformers repeats the last row)
        pos = np.asarray([[start + prep.rope_delta]], dtype=np.int64)
        return self._feeds(state, pos, self._mask(prep, state)[None, -1:])

    def _mask(self, prep, state: CrossState) -> np.ndarray:
        """[S, tiles] int64: which tile slots each prompt token attends."""
        mask = prep.extras.get("cross_attention_mask")
        if mask is None or not state.has_image:
            return np.zeros((len(prep.input_ids), state.tiles), dtype=np.int64)
        return mask.reshape(len(prep.input_ids), -1)


@dataclass
class TiledImage:
    """One image as a batch of square tiles (Idefics3 / SmolVLM, InternVL): the vision encoder's input."""

    pixel_values: np.ndarray  # [tiles, C, S, S] float32, the global view / thumbnail (if any) last
    rows: int  # the tile grid as the family's processor reports it (Idefics3: 0 x 0 for a lone tile)
    cols: int

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


class TileBatchMerge(EmbeddingMerge):
    """Method A over tiles: the vision encoder takes one image's tiles as a batch [tiles, C, S, S], the projector
    gives [tiles, tokens_per_tile, hidden], written over the image tokens tile after tile; plain 1D positions.
    A family adds its preprocessing (`preprocess` -> TiledImage) and prompt markup (`image_text`)."""

    tokens_per_tile: int

    def image_token_count(self, img: TiledImage) -> int:
        return self.tokens_per_tile * img.num_tiles

    def vision_feeds(self, img: TiledImage) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(img.pixel_values, dtype=np.float32)}

    def vision_limits(self, spec, img: TiledImage) -> str:
        d = spec.dims["num_tiles"]
        return f"it becomes {img.num_tiles} tiles, but this build's vision encoder takes {d.min} to {d.max} tiles per image"

    def projector_outputs_in_reference_order(self, img, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        e = outputs["image_embeds"]  # [tiles, tokens_per_tile, hidden] -> the image's tokens in prompt order
        return {**outputs, "image_embeds": e.reshape(-1, e.shape[-1])}

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[Any]) -> tuple[np.ndarray, int]:
        return np.arange(len(input_ids), dtype=np.int64)[None, :], 0

    def step_positions(self, start: int, count: int, delta: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)[None, :] + delta
