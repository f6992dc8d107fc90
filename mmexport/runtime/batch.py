"""Slots: several requests decoding together over one static KV cache (torch-free; `mmexport serve`).

The decoder's batch axis is dynamic (1..the build's `max_batch`). `SlotDecoder` allocates the cache once
as `[slots, kv_heads, capacity, head_dim]` per layer plus `cache_mask [slots, capacity]`; each running
request owns one row (a slot) with its own length, positions and mask:

  admit(slot, prep, state)  the request's prompt through the decoder at batch 1, written into its row
                            (exactly the single-request path: `Pipeline.prefill` on a row view)
  step({slot: token})       one decoder call for every active slot: rows [0, hi) where hi is one past the
                            highest active slot; rows in between that are free decode a dummy token over an
                            all-zero mask and their outputs are dropped. Nothing is copied or gathered: the
                            cache, the mask and the per-request inputs are fed as views `[:hi]` of the
                            preallocated buffers (a leading-axis slice is contiguous), and each active row
                            writes its new key/value at its own length.
  release(slot)             frees the row at once (its mask is cleared; the next request overwrites it)

New requests take the lowest free slot, so `hi` stays as small as the number of running requests allows.

Inputs a request keeps for its whole life (`FamilyRuntime.request_inputs`: Method B's cross K/V) are
held per slot too, in buffers padded to their dims' maximum (Method B: the build's max cross tiles;
the cross-attention mask, zero-padded, marks which tiles are real). Every other step input comes from the
family's `step_feeds` per row and is concatenated along the batch axis the decoder declares.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .pipeline import KVCache, Pipeline, Prepared


class SlotDecoder:
    def __init__(self, pipe: Pipeline, slots: int):
        spec = pipe.specs["decoder"]
        limit = spec.dims["batch"].max if "batch" in spec.dims else 1
        if slots < 1 or slots > limit:
            raise UserError(f"{slots} slots asked; this build's decoder takes 1..{limit} rows (rebuild with `mmexport build --max-batch N`)")
        self.pipe, self.spec, self.slots = pipe, spec, slots
        self.cache = KVCache(spec, batch=slots)
        self.rows: list[KVCache | None] = [None] * slots
        self.requests: list[tuple[Prepared, Any] | None] = [None] * slots
        self.batch_axis = {t.name: t.shape.index("batch") for t in spec.inputs if "batch" in t.shape}
        self.resident: dict[str, np.ndarray] = {}  # per-slot request inputs, allocated at the first admit
        self.fixed: dict[str, int] = {}  # dims the resident buffers fix at their maximum

    # -- slots ---------------------------------------------------------------------------------------
    def free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.rows) if r is None), None)

    @property
    def active(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def length(self, slot: int) -> int:
        row = self.rows[slot]
        return row.length if row is not None else 0

    def admit(self, slot: int, prep: Prepared, state: Any) -> np.ndarray:
        """Prefill `prep` (with its vision state) into `slot`; returns the first token's logits [V]."""
        if self.rows[slot] is not None:
            raise RuntimeError(f"slot {slot} is taken")
        row = self.cache.row(slot)
        row.mask[:] = 0
        logits = self.pipe.prefill(prep, state, row)
        self._hold(slot, self.pipe.family.request_inputs(state))
        self.rows[slot], self.requests[slot] = row, (prep, state)
        return logits

    def release(self, slot: int) -> None:
        row = self.rows[slot]
        if row is not None:
            row.mask[:] = 0
        self.rows[slot] = self.requests[slot] = None

    def _hold(self, slot: int, inputs: dict[str, np.ndarray]) -> None:
        for name, arr in inputs.items():
            buf = self.resident.get(name)
            if buf is None:
                t = self.spec.input(name)
                size = {d: (self.slots if d == "batch" else self.spec.dims[d].max) for d in t.dim_names()}
                self.fixed.update({d: n for d, n in size.items() if d != "batch"})
                buf = self.resident[name] = np.zeros(tuple(size.get(d, d) for d in t.shape), dtype=t.dtype)
            dst = buf[slot : slot + 1]
            dst[...] = 0
            dst[tuple(slice(0, n) for n in arr.shape)] = arr

    # -- one decode step for every active slot ----------------------------------------------------
    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """Feed each slot in `tokens` (active slots) its next token; returns each one's next-token logits [V].
        Rows below the highest one that are not stepped (free, or just admitted) decode a dummy token whose
        outputs are dropped: their cache is neither written nor advanced."""
        if not tokens or any(self.rows[s] is None for s in tokens):
            raise RuntimeError(f"step needs tokens for active slots {self.active}, got {sorted(tokens)}")
        hi = max(tokens) + 1
        ids = np.zeros((hi, 1), dtype=np.int64)
        for slot, tok in tokens.items():
            ids[slot, 0] = tok
        embeds = self.pipe.runners["embed_tokens"].infer({"input_ids": ids})["inputs_embeds"]
        family = self.pipe.family
        per_row: dict[int, dict[str, np.ndarray]] = {}
        for slot in tokens:
            prep, state = self.requests[slot]
            feeds = family.step_feeds(prep, state, self.rows[slot].length)
            per_row[slot] = {k: self._pad(k, v) for k, v in feeds.items() if k not in self.resident}
        filler = per_row[min(tokens)]  # free rows below hi: any valid input, their mask is all zero
        feeds = {
            name: np.concatenate([per_row.get(b, filler)[name] for b in range(hi)], axis=self.batch_axis[name])
            for name in filler
        }
        out = self.pipe.runners["decoder"].infer({
            "inputs_embeds": embeds,
            **feeds,
            "cache_mask": self.cache.mask[:hi],
            **{n: a[:hi] for n, a in self.cache.arrays.items()},
            **{n: a[:hi] for n, a in self.resident.items()},
        })
        new = [n[len("cache_"):] for n in self.cache.arrays]
        for slot in tokens:
            self.rows[slot].append({n: out[n][slot : slot + 1] for n in new})
        return {slot: out["logits"][slot, -1] for slot in tokens}

    def _pad(self, name: str, arr: np.ndarray) -> np.ndarray:
        """Zero-pad `arr` along the dims the resident buffers hold at their maximum (Method B: cross tiles)."""
        t = self.spec.input(name)
        pads = [(0, self.fixed[d] - n) if isinstance(d, str) and d in self.fixed else (0, 0) for d, n in zip(t.shape, arr.shape)]
        return np.pad(arr, pads) if any(p for _, p in pads) else arr
