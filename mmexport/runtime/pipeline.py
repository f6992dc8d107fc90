"""The torch-free pipeline that stitches the exported components together:

  preprocess image -> vision stages (Method A: vision_encoder -> projector -> merged into the token
  embeddings; Method B: vision_encoder -> projector -> cross_kv, once per request)
  -> decoder prefill -> decode loop (one token at a time, KV cache carried between steps)

Family specifics (patching, tiling, rotary tables, position ids, which method) come from the family
runtime named in the manifest (runtime/methods.py); everything here is generic and backend-independent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import PromptTooLong, UserError
from .backends import component_runner
from .image import load_image
from .manifest import load_manifest
from .prompt import PromptBuilder, user_message
from .sampling import Sampler, SamplingParams


@dataclass
class Prepared:
    input_ids: np.ndarray  # [S] int64
    images: list[Any]  # family EncodedImage objects
    position_ids: np.ndarray  # the family's layout: [3, 1, S] M-RoPE, [1, S] plain
    rope_delta: int
    text: str  # the rendered prompt (placeholders expanded)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. Method B's cross-attention mask


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stop_reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # component -> inferences this request ran

    @property
    def tokens_per_s(self) -> float:
        # decode throughput: tokens after the first, over the decode time
        n = max(len(self.token_ids) - 1, 0)
        t = self.timings_ms.get("decode", 0.0)
        return n / (t / 1000.0) if n and t > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": len(self.token_ids),
            "stop_reason": self.stop_reason,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "calls": self.calls,
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


class KVCache:
    """A static KV cache, allocated once at the decoder's capacity and written in place (gpt-fast style).

    Layout per layer: keys/values `[batch, kv_heads, capacity, head_dim]` plus one `cache_mask
    [batch, capacity]`. The decoder returns only the new tokens' keys/values; `append` copies those S
    positions into the buffer. The past is never copied or concatenated, and the buffers keep their
    addresses for the whole request. What the decoder is fed (the graph's `cache_len` axis):

    - `whole=True` (TensorRT: its decode profile is the fixed capacity, as CUDA graphs like): the whole
      buffer, masked, except while nothing is cached (a request's first prefill), when it gets
      zero-length views so the prompt does not attend to `capacity` empty slots;
    - `whole=False` (ONNX Runtime on the CPU): views of the filled slots only, so attention's work and
      the cache bytes a decode step reads grow with the request instead of being the capacity's.
    """

    def __init__(self, decoder_spec, batch: int = 1, whole: bool = True):
        self.names = [t.name for t in decoder_spec.inputs if t.name.startswith("cache_") and t.name != "cache_mask"]
        mask = decoder_spec.input("cache_mask")
        # builds made before the cache_len axis existed declare the capacity as a fixed size: always fed whole
        self.empty_views = mask.shape[1] == "cache_len"
        self.whole = whole or not self.empty_views
        self.capacity = int(decoder_spec.dims["cache_len"].max if self.empty_views else mask.shape[1])
        sizes = {"batch": batch, "cache_len": self.capacity}
        self.arrays: dict[str, np.ndarray] = {}
        for t in decoder_spec.inputs:
            if t.name in self.names:
                if t.shape[2] not in ("cache_len", self.capacity):
                    raise ValueError(f"{t.name}: expected [batch, kv_heads, cache_len, head_dim], got {t.shape}")
                self.arrays[t.name] = np.zeros(tuple(sizes.get(d, d) for d in t.shape), dtype=t.dtype)
        self.mask = np.zeros((batch, self.capacity), dtype=mask.dtype)
        self.length = 0
        self.seconds = 0.0  # wall time spent writing new keys/values into the buffers (bench --profile)

    def feeds(self) -> dict[str, np.ndarray]:
        if self.empty_views and (self.length == 0 or not self.whole):  # views of the filled slots (axis 2 = cache_len)
            n = self.length
            return {"cache_mask": self.mask[:, :n], **{k: a[:, :, :n] for k, a in self.arrays.items()}}
        return {"cache_mask": self.mask, **self.arrays}

    def row(self, i: int) -> "KVCache":
        """Row `i` as a cache of its own (batch 1, its own length): views of this cache's buffers, so what
        it writes lands in row i of the shared buffers (the batching runtime gives each request a row)."""
        r = object.__new__(KVCache)
        r.names, r.empty_views, r.capacity, r.length, r.seconds = self.names, self.empty_views, self.capacity, 0, 0.0
        r.whole = self.whole
        r.arrays = {n: a[i : i + 1] for n, a in self.arrays.items()}
        r.mask = self.mask[i : i + 1]
        return r

    def append(self, outputs: dict[str, np.ndarray]) -> None:
        """Write this step's keys/values (outputs `key_i`/`value_i`) after the filled slots."""
        t0 = time.perf_counter()
        n = 0
        for name, buf in self.arrays.items():
            new = outputs[name[len("cache_") :]]
            n = new.shape[2]
            if self.length + n > self.capacity:
                raise UserError(f"the KV cache holds {self.capacity} tokens; this request needs more")
            buf[:, :, self.length : self.length + n] = new
        self.mask[:, self.length : self.length + n] = 1
        self.length += n
        self.seconds += time.perf_counter() - t0


class Pipeline:
    def __init__(self, artifact_dir: Path | str, backend: str = "ort", check_files: bool = True, rehash: bool = False, **runner_kw):
        self.manifest = load_manifest(artifact_dir, check_files=check_files, rehash=rehash)
        m = self.manifest
        from ..families import get_runtime

        try:
            self.family = get_runtime(m.family, m.model)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # the manifest's "model" section is the family's data
            raise UserError(f"{m.root / 'manifest.json'}: model: the {m.family} runtime cannot use it "
                            f"({type(e).__name__}: {e}); rebuild") from None
        self.specs = m.components
        # the components every pipeline runs: the family's image stages, the embedding and the decoder
        needed = [*self.family.image_stages.values(), "embed_tokens", "decoder"]
        missing = [c for c in needed if c not in self.specs]
        if missing:
            raise UserError(f"{m.root / 'manifest.json'}: components: no {', '.join(missing)} (a {m.family} build has "
                            f"{', '.join(needed)}); rebuild")
        self.runners = {
            name: component_runner(backend, m, name, spec, **runner_kw).activate() for name, spec in self.specs.items()
        }
        tok = m.tokenizer
        template = m.read_text(tok["chat_template"]) if tok.get("chat_template") else None
        try:
            self.prompts = PromptBuilder(template, m.path(tok["file"]), tok.get("special_tokens", {}))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{m.root}: {tok['file']}: the tokenizers library cannot load it ({msg}); rebuild") from None
        self.eos_ids = set(int(i) for i in tok.get("eos_token_ids", []))
        self.max_context = int(m.limits["max_context"])
        self.max_images = int(m.limits["max_images"])

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    # -- pieces (verify calls these one by one) -----------------------------------------------------
    def prepare(self, prompt: str, images: Sequence[Any] = (), raw_prompt: bool = False) -> Prepared:
        """Render, expand and tokenize the prompt; preprocess the images (paths or PIL images)."""
        encoded = self._preprocess(images)
        text = prompt if raw_prompt else self.prompts.render(user_message(prompt, len(encoded)))
        return self._prepare_text(text, encoded)

    def prepare_chat(self, messages: list[dict[str, Any]], images: Sequence[Any] = ()) -> Prepared:
        """A whole conversation (system/user/assistant turns; `{"type": "image"}` content parts in the order
        of `images`) rendered with the chat template, as `prepare` renders one user turn."""
        encoded = self._preprocess(images)
        return self._prepare_text(self.prompts.render(messages), encoded)

    def _preprocess(self, images: Sequence[Any]) -> list[Any]:
        if len(images) > self.max_images:
            raise UserError(f"{len(images)} images given; this build allows at most {self.max_images} per prompt")
        pils = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        encoded = self.family.preprocess_images(pils)
        for i, (im, pil, enc) in enumerate(zip(images, pils, encoded)):
            self._check_vision_input(i, im, pil, enc)
        return encoded

    def _prepare_text(self, text: str, encoded: list[Any]) -> Prepared:
        text, ids_list = self.family.prompt_ids(self.prompts, text, encoded)
        ids = np.asarray(ids_list, dtype=np.int64)
        if len(ids) == 0:
            raise UserError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; this build's context is {self.max_context} tokens")
        pos, delta = self.family.prompt_positions(ids, encoded)
        return Prepared(ids, encoded, pos, delta, text, self.family.prompt_extras(ids, encoded))

    def _check_vision_input(self, index: int, source: Any, image: Any, enc: Any) -> None:
        """An image whose preprocessed form falls outside the vision encoder's declared range (its
        optimization profile) is refused here, before any inference, in the user's terms: what the
        family's `vision_limits(spec, encoded)` says the build accepts (pixels, aspect ratio), never
        the internal dim that overflowed."""
        spec = self.specs.get("vision_encoder")
        if spec is None:
            return
        try:
            spec.check_feed(self.family.vision_feeds(enc))
        except ValueError:
            label = str(source) if isinstance(source, (str, Path)) else f"image {index + 1}"
            size = f" ({image.size[0]}x{image.size[1]} pixels)" if hasattr(image, "size") else ""
            limits = getattr(self.family, "vision_limits", None)
            why = limits(spec, enc) if limits else "this build's vision encoder was not exported for an image of this size"
            raise UserError(f"{label}{size}: {why}") from None

    def encode_images(self, images: Sequence[Any]):
        """The family's vision state for the request (Method A: image embeddings; B: cross K/V)."""
        return self.family.encode_images(self, images)

    def new_cache(self) -> KVCache:
        """An empty cache for one request, fed as the decoder's backend runs best (`Runner.whole_cache`)."""
        return KVCache(self.specs["decoder"], whole=self.runners["decoder"].whole_cache)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runners["embed_tokens"].infer({"input_ids": ids.reshape(1, -1).astype(np.int64)})["inputs_embeds"]

    def decoder_step(self, embeds: np.ndarray, feeds: dict[str, np.ndarray], cache: KVCache) -> np.ndarray:
        """Run the decoder on `embeds` [1, S, H] after the cached tokens; returns last-position logits [V]."""
        out = self.runners["decoder"].infer({"inputs_embeds": embeds, **feeds, **cache.feeds()})
        cache.append(out)
        return out["logits"][0, -1]

    def prefill(self, prep: Prepared, state, cache: KVCache) -> np.ndarray:
        """The prompt through the decoder (the cache must be empty); returns the first token's logits."""
        return self.decoder_step(self.family.prompt_embeds(self, prep, state), self.family.prefill_feeds(prep, state), cache)

    # -- the whole request ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        raw_prompt: bool = False,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        timings: dict[str, float] = {}
        calls0 = {name: r.calls for name, r in self.runners.items()}
        seconds0 = {name: r.seconds for name, r in self.runners.items()}
        t0 = time.perf_counter()
        prep = self.prepare(prompt, images, raw_prompt=raw_prompt)
        t1 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1e3
        state = self.encode_images(prep.images)
        t2 = time.perf_counter()
        # each image stage is its component's runner time; vision also takes the loop's own overhead
        for stage, comp in self.family.image_stages.items():
            timings[stage] = (self.runners[comp].seconds - seconds0[comp]) * 1e3 if comp in self.runners else 0.0
        timings["vision"] = (t2 - t1) * 1e3 - sum(v for k, v in timings.items() if k in self.family.image_stages and k != "vision")

        cache = self.new_cache()
        logits = self.prefill(prep, state, cache)
        t3 = time.perf_counter()
        timings["prefill"] = (t3 - t2) * 1e3
        timings["ttft"] = (t3 - t0) * 1e3

        at_decode = {name: (r.seconds, r.check_seconds) for name, r in self.runners.items()}
        budget = min(max_new_tokens, self.max_context - len(prep.input_ids))
        sampler = Sampler(sampling)
        stream = TextStream(self.prompts, stop, on_text)
        generated: list[int] = []
        reason = "length"
        prefill_cache_s = cache.seconds
        sample_s = detok_s = 0.0  # host-side pieces of the decode loop (bench --profile)
        while len(generated) < budget:
            ta = time.perf_counter()
            tok = sampler(logits)
            tb = time.perf_counter()
            sample_s += tb - ta
            if tok in self.eos_ids and not ignore_eos:
                reason = "eos"
                break
            generated.append(tok)
            stopped = stream.push(generated)
            detok_s += time.perf_counter() - tb
            if stopped:
                reason = "stop"
                break
            if len(generated) == budget:
                break
            logits = self.decoder_step(self.embed(np.asarray([tok])), self.family.step_feeds(prep, state, cache.length), cache)
        stream.finish(generated)
        t4 = time.perf_counter()
        timings["decode"] = (t4 - t3) * 1e3
        timings["decode_sample"], timings["decode_detokenize"] = sample_s * 1e3, detok_s * 1e3
        timings["decode_cache_write"] = (cache.seconds - prefill_cache_s) * 1e3
        for name, r in self.runners.items():  # each component's inference and feed-check time in the decode loop
            if r.seconds > at_decode[name][0]:
                timings[f"decode_run.{name}"] = (r.seconds - at_decode[name][0]) * 1e3
                timings[f"decode_check.{name}"] = (r.check_seconds - at_decode[name][1]) * 1e3
        timings["total"] = (t4 - t0) * 1e3
        calls = {name: r.calls - calls0[name] for name, r in self.runners.items()}
        return GenerationResult(stream.text, generated, int(len(prep.input_ids)), reason, timings, calls)


class TextStream:
    """Incremental detokenization with stop strings; emits only complete characters.

    Each token costs a decode of a short window, not of the whole answer so far: the text is committed in
    deltas, decode(ids[prefix:]) minus decode(ids[prefix:read]) — both decodes start at the same token, so a
    tokenizer that drops a leading space at the start of a decode (SentencePiece's metaspace) drops it in both
    and the difference is exact; an incomplete UTF-8 sequence waits for the next token.
    """

    def __init__(self, prompts: PromptBuilder, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.prompts, self.stop, self.on_text = prompts, [s for s in stop if s], on_text
        self.text = ""
        self.emitted = 0
        self._prefix = 0  # ids[_prefix:_read] decode to the committed text's tail
        self._read = 0
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def push(self, ids: list[int]) -> bool:
        decode = self.prompts.decode
        window = decode(ids[self._prefix:])
        before = decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        if len(window) > len(before) and not window.endswith("\ufffd"):  # a complete new piece of text
            start = max(0, len(self.text) - self._longest_stop + 1)  # where a stop string could newly begin
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(ids)
            hit = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if hit >= 0:
                self.text = self.text[:hit]
                self._emit(len(self.text))
                return True
            # hold back a tail that could still become a stop string
            self._emit(max(self.emitted, len(self.text) - max(self._longest_stop - 1, 0)))
        return False

    def _emit(self, upto: int) -> None:
        if self.on_text and upto > self.emitted:
            self.on_text(self.text[self.emitted : upto])
        self.emitted = max(self.emitted, upto)

    def finish(self, ids: Sequence[int] | None = None) -> None:
        """Emit what is held back (`ids`: the whole answer, to flush a trailing incomplete character too)."""
        if ids is not None and len(ids) > self._read:
            decode = self.prompts.decode
            window = decode(list(ids[self._prefix:]))
            before = decode(list(ids[self._prefix:self._read])) if self._read > self._prefix else ""
            self.text += window[len(before):]
            self._prefix = self._read = len(ids)
        self._emit(len(self.text))
