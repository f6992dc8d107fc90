"""The serving engine: continuous batching of generation requests over the static KV cache (torch-free).

One engine thread owns the pipeline and a `SlotDecoder` (runtime/batch.py). Each loop iteration:

  1. drops cancelled requests (a client that went away) and frees their slots at once;
  2. admits the oldest queued request if a slot is free: vision stages + prefill at batch 1 into its
     row (one admission per iteration, so running requests keep decoding between prefills);
  3. picks each running request's next token from its logits with its own sampler (greedy, or seeded
     sampling), with exactly the stop rules of `Pipeline.generate` (EOS, stop strings, the token
     budget); a finished request frees its slot;
  4. runs one decoder step for all running requests together.

Prompts are rendered, tokenized and their images preprocessed by the caller (the HTTP worker threads),
so a bad request is refused before it is queued. Results come back as `Event`s through the request's
callback, called on the engine thread.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UserError
from ..runtime.batch import SlotDecoder
from ..runtime.pipeline import Pipeline, Prepared, TextStream
from ..runtime.sampling import Sampler, SamplingParams


class QueueFull(Exception):
    """The wait queue is at its limit (HTTP 429)."""


class ShuttingDown(Exception):
    """The engine no longer takes requests (HTTP 503)."""


@dataclass
class Event:
    kind: str  # "text": new text (maybe empty) and the token that made it; "done": finished; "error"
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None  # done: "stop" (EOS or a stop string), "length", "cancelled"
    usage: dict[str, int] | None = None
    message: str = ""  # error


@dataclass
class GenRequest:
    prep: Prepared
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: Sequence[str] = ()
    on_event: Callable[[Event], None] = lambda e: None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Running:
    req: GenRequest
    slot: int
    sampler: Sampler
    stream: TextStream
    budget: int
    logits: np.ndarray
    pending: list[str]  # text the stream emitted for the latest token
    generated: list[int] = field(default_factory=list)
    last: float = 0.0  # time the previous token was emitted


class Engine:
    def __init__(self, pipe: Pipeline, max_batch: int, max_queue: int = 64, metrics: Any = None):
        self.pipe = pipe
        self.decoder = SlotDecoder(pipe, max_batch)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self._queue: deque[GenRequest] = deque()
        self._running: dict[int, _Running] = {}
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mmexport-engine", daemon=True)
        self.steps = 0  # decoder steps run (batched); tests and metrics read it
        self.max_rows_seen = 0  # the most requests one decoder step has served
        self.rows_served = 0  # requests served by all decoder steps (mean batch = rows_served / steps)
        self.step_seconds = 0.0  # time in batched decode steps (aggregate decode rate = rows_served / step_seconds)

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            # a request may wait when every slot is taken, up to max_queue of them
            if len(self._queue) + len(self._running) >= self.max_batch + self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._queue)} requests wait")
            self._queue.append(req)
            self._gauges()
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for queued and running requests to finish (a server stops accepting
        connections first; requests already on their way are still taken until `stop`)."""
        with self._cond:
            end = time.monotonic() + timeout
            while (self._queue or self._running) and time.monotonic() < end:
                self._cond.wait(min(0.05, max(0.0, end - time.monotonic())))
            return not (self._queue or self._running)

    def stop(self) -> None:
        """Cancel whatever still runs or waits, and end the engine thread."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                req, skipped = None, []
                while req is None and self._queue and self.decoder.free_slot() is not None:
                    req = self._queue.popleft()
                    if req.cancelled.is_set():  # its client went away while it waited
                        skipped.append(req)
                        req = None
                self._gauges()
            for gone in skipped:
                self._emit(gone, Event("done", finish_reason="cancelled"))
            try:
                self._iteration(req)
            except Exception as e:  # an engine bug must not hang every client: fail what is running
                for run in list(self._running.values()):
                    self._finish(run, error=f"internal error: {type(e).__name__}: {e}")
            with self._cond:
                self._cond.notify_all()  # drain() waits on this
        for run in list(self._running.values()):
            self._finish(run, reason="cancelled")
        with self._cond:
            while self._queue:
                self._emit(self._queue.popleft(), Event("done", finish_reason="cancelled", usage=None))
            self._gauges()

    def _iteration(self, req: GenRequest | None) -> None:
        for run in list(self._running.values()):
            if run.req.cancelled.is_set():
                self._finish(run, reason="cancelled")
        if req is not None:
            self._admit(req)
        for run in list(self._running.values()):
            self._next_token(run)
        if self._running:
            t0 = time.perf_counter()
            out = self.decoder.step({r.slot: r.generated[-1] for r in self._running.values()})
            self.step_seconds += time.perf_counter() - t0
            self.steps += 1
            self.max_rows_seen = max(self.max_rows_seen, len(out))
            self.rows_served += len(out)
            if self.metrics:
                self.metrics.batch_rows.observe(len(out))
            for run in self._running.values():
                run.logits = out[run.slot]

    def _admit(self, req: GenRequest) -> None:
        pipe, slot = self.pipe, self.decoder.free_slot()
        try:
            state = pipe.encode_images(req.prep.images)
            logits = self.decoder.admit(slot, req.prep, state)
        except Exception as e:  # this request fails; the others go on
            self.decoder.release(slot)
            self._emit(req, Event("error", message=str(e) if isinstance(e, UserError) else f"internal error: {type(e).__name__}: {e}"))
            return
        budget = min(req.max_tokens, pipe.max_context - len(req.prep.input_ids))
        pending: list[str] = []
        stream = TextStream(pipe.prompts, req.stop, pending.append)
        self._running[slot] = _Running(req, slot, Sampler(req.sampling), stream, budget, logits, pending=pending)
        self._gauges()

    def _next_token(self, run: _Running) -> None:
        """One token for `run`, with `Pipeline.generate`'s rules; finishes it when it is done."""
        tok = run.sampler(run.logits)
        if tok in self.pipe.eos_ids and not run.req.ignore_eos:
            self._finish(run, reason="stop")
            return
        run.generated.append(tok)
        hit = run.stream.push(run.generated)
        now = time.perf_counter()
        if self.metrics:
            if len(run.generated) == 1:
                self.metrics.ttft.observe(now - run.req.submitted)
            else:
                self.metrics.tpot.observe(now - run.last)
            self.metrics.tokens.inc()
        run.last = now
        self._emit(run.req, Event("text", "".join(run.pending), tok))
        run.pending.clear()
        if hit:
            self._finish(run, reason="stop")
        elif len(run.generated) >= run.budget:
            self._finish(run, reason="length")

    def _finish(self, run: _Running, reason: str = "stop", error: str | None = None) -> None:
        self._running.pop(run.slot, None)
        self.decoder.release(run.slot)
        self._gauges()
        if error is not None:
            self._emit(run.req, Event("error", message=error))
            return
        run.stream.finish(run.generated)
        usage = {"prompt_tokens": int(len(run.req.prep.input_ids)), "completion_tokens": len(run.generated)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if run.pending:
            self._emit(run.req, Event("text", "".join(run.pending)))
            run.pending.clear()
        self._emit(run.req, Event("done", finish_reason=reason, usage=usage))

    def _emit(self, req: GenRequest, ev: Event) -> None:
        if self.metrics and ev.kind in ("done", "error"):
            self.metrics.requests.labels(status=ev.finish_reason if ev.kind == "done" else "error").inc()
        try:
            req.on_event(ev)
        except Exception:  # a consumer that went away must not stop the engine
            req.cancel()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(len(self._running))

