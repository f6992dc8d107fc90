"""`mmexport serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI +
uvicorn, torch-free).

  POST /v1/chat/completions   OpenAI chat completions (stream or not); errors in OpenAI's JSON format
  GET  /v1/models             the served model
  GET  /health                200 once every session is loaded; 503 while loading or shutting down
  GET  /metrics               Prometheus text

The sessions load in a background thread after the socket is open, so /health can say "loading".
Shutdown (SIGINT/SIGTERM): no new connections, running requests finish (up to --shutdown-timeout
seconds), then whatever is left is cancelled.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PromptTooLong, UserError
from .engine import Engine, Event, GenRequest, QueueFull, ShuttingDown
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openai_api import ApiError, Limits, chunk, completion, completion_id, parse_chat_request

log = logging.getLogger("mmexport.serve")


@dataclass
class ServeConfig:
    artifacts: Path
    backend: str = "ort"
    max_batch: int | None = None  # default: the build's max_batch
    max_queue: int = 64
    api_key: str | None = None
    model_name: str | None = None  # default: the recipe's name
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    local_media: Path | None = None
    remote_images: bool = False
    shutdown_timeout: float = 30.0
    runner_kw: dict[str, Any] = field(default_factory=dict)


class _State:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.status = "loading"  # loading, ready, failed, stopping
        self.error = ""
        self.pipe = None
        self.engine: Engine | None = None
        self.limits: Limits | None = None
        self.model = cfg.model_name or cfg.artifacts.resolve().name
        self.metrics = Metrics(self.model)
        self.created = int(time.time())
        self.arriving = 0  # chat handlers running: streamed requests until queued, others until answered

    def load(self) -> None:
        """Open every session (in a thread: the socket answers /health meanwhile)."""
        from ..runtime.pipeline import Pipeline

        try:
            pipe = Pipeline(self.cfg.artifacts, backend=self.cfg.backend, **self.cfg.runner_kw)
            build_batch = int(pipe.manifest.limits.get("max_batch", 1))
            slots = self.cfg.max_batch or build_batch
            engine = Engine(pipe, slots, self.cfg.max_queue, self.metrics)
            self.metrics.slots.set(slots)
            self.limits = Limits(
                max_tokens=int(pipe.manifest.limits["max_new_tokens"]),
                max_images=pipe.max_images,
                max_image_pixels=self.cfg.max_image_pixels,
                local_media=self.cfg.local_media,
                remote_images=self.cfg.remote_images,
            )
            self.model = self.cfg.model_name or str(pipe.manifest.data["recipe"].get("name") or self.model)
            self.metrics.info.clear()
            self.metrics.info.labels(model=self.model).set(1)
            self.pipe, self.engine = pipe, engine.start()
            self.status = "ready"
            log.info("ready: %s as %r, %d slots, context %d", self.cfg.artifacts, self.model, slots, pipe.max_context)
        except Exception as e:  # reported by /health and every request; the process keeps serving that
            self.status, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.cfg.artifacts, self.error)

    def stop_engine(self) -> None:
        """/health says "stopping"; running and queued requests (and those already on their way) get up
        to --shutdown-timeout seconds to finish, then the rest are cancelled (their clients get a 503, or
        an error event on a stream)."""
        self.status = "stopping"
        if self.engine is not None:
            end = time.monotonic() + self.cfg.shutdown_timeout
            while self.arriving and time.monotonic() < end:  # e.g. requests read and prepared, not yet queued
                time.sleep(0.02)
            if not self.engine.drain(max(0.0, end - time.monotonic())):
                log.warning("shutdown: cancelling %d running and %d queued requests", self.engine.running, self.engine.queue_depth)
            self.engine.stop()

    def shutdown(self) -> None:
        self.stop_engine()
        if self.pipe is not None:
            self.pipe.close()


def create_app(cfg: ServeConfig) -> FastAPI:
    state = _State(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, name="mmexport-load", daemon=True)
        loader.start()
        yield
        await run_in_threadpool(loader.join)
        await run_in_threadpool(state.shutdown)

    app = FastAPI(title="mmexport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status != 503:
            state.metrics.requests.labels(status="rejected").inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = ApiError(e.status_code, str(e.detail), type="invalid_request_error", code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    def ready() -> None:
        if state.status == "loading":
            raise ApiError(503, "the model is still loading", type="service_unavailable", headers={"Retry-After": "1"})
        if state.status == "failed":
            raise ApiError(503, f"the model failed to load: {state.error}", type="service_unavailable")

    def authorize(request: Request) -> None:
        if not cfg.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)" if got else
                           "missing API key (send Authorization: Bearer KEY)", type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        limit = cfg.max_body_bytes
        buf, size = bytearray(), 0
        async for part in request.stream():
            size += len(part)
            if size <= limit:
                buf += part
            elif size > 16 * limit:
                break  # past this, stop reading: the connection is closed after the answer
        if size > limit:
            # the body is read (and dropped) first, so that the client, still sending, gets the answer
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        try:
            return json.loads(buf)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        code = 200 if state.status == "ready" else 503
        body: dict[str, Any] = {"status": state.status}
        if state.status == "ready" and state.engine:
            body.update(model=state.model, slots=state.engine.max_batch, running=state.engine.running, queued=state.engine.queue_depth)
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        entry: dict[str, Any] = {"id": state.model, "object": "model", "created": state.created, "owned_by": "mmexport"}
        if state.pipe is not None:
            entry["max_model_len"] = state.pipe.max_context
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.perf_counter()
        authorize(request)
        ready()
        state.arriving += 1
        try:
            return await _chat(request, arrived)
        finally:
            state.arriving -= 1

    async def _chat(request: Request, arrived: float):
        body = await read_json(request)
        req = await run_in_threadpool(parse_chat_request, body, state.limits)
        if req.model is not None and req.model != state.model:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {state.model!r}", "model", code="model_not_found")
        try:
            prep = await run_in_threadpool(state.pipe.prepare_chat, req.messages, req.images)
        except PromptTooLong as e:
            raise ApiError(400, str(e), "messages", code="context_length_exceeded") from None
        except UserError as e:
            raise ApiError(400, str(e), "messages") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        gen = GenRequest(prep, req.max_tokens, req.sampling, req.stop,
                         on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), submitted=arrived)
        try:
            state.engine.submit(gen)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="service_unavailable") from None
        state.metrics.prompt_tokens.inc(len(prep.input_ids))
        cid = completion_id()
        if req.stream:
            return StreamingResponse(_sse(gen, events, cid, state.model, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, gen, events, cid, state.model)

    return app


_FINISH = {"stop": "stop", "length": "length"}


async def _collect(request: Request, gen: GenRequest, events: asyncio.Queue, cid: str, model: str):
    text: list[str] = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # the client went away: free the slot now
                    gen.cancel()
                    return Response(status_code=499)
                continue
            if ev.kind == "text":
                text.append(ev.text)
            elif ev.kind == "error":
                raise ApiError(500, ev.message, type="server_error")
            elif ev.finish_reason == "cancelled":
                raise ApiError(503, "the request was cancelled: the server is shutting down", type="service_unavailable")
            else:
                return completion(cid, model, "".join(text), _FINISH[ev.finish_reason], ev.usage)
    finally:
        gen.cancel()  # a no-op once done; frees the slot if this handler was cancelled


async def _sse(gen: GenRequest, events: asyncio.Queue, cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield data(chunk(cid, model, created, {"role": "assistant", "content": ""}, with_usage=include_usage))
        while True:
            ev = await events.get()
            if ev.kind == "text":
                if ev.text:
                    yield data(chunk(cid, model, created, {"content": ev.text}, with_usage=include_usage))
            elif ev.kind == "error" or ev.finish_reason == "cancelled":
                msg = ev.message or "the request was cancelled: the server is shutting down"
                yield data(ApiError(500 if ev.kind == "error" else 503, msg, type="server_error").body())
                break
            else:
                yield data(chunk(cid, model, created, {}, _FINISH[ev.finish_reason], with_usage=include_usage))
                if include_usage:
                    yield data(chunk(cid, model, created, None, usage=ev.usage, with_usage=True))
                break
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client disconnected (the generator is closed) or we are done: free the slot


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn; its logs, access log included, go to stderr)."""
    import copy
    import sys

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for data
    log_config["loggers"]["mmexport.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    app = create_app(cfg)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn closes the listener, then waits for open requests; the engine's own drain runs
            # meanwhile and cancels what outlasts --shutdown-timeout, so every client gets an answer
            # before uvicorn's own (later) deadline would cut the connections
            threading.Thread(target=app.state.mm.stop_engine, name="mmexport-drain", daemon=True).start()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_config=log_config,
                            timeout_graceful_shutdown=int(cfg.shutdown_timeout) + 10, access_log=True)
    server = Server(config)
    server.run()
    if not server.started:
        sys.exit(2)
