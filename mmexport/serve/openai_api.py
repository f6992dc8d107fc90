"""OpenAI's chat-completions format, torch-free: request validation, image sources, responses and errors.

Requests are plain JSON checked here (not by a schema library) so that every refusal is OpenAI's error
object `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses.
"""
from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the operator allows (`mmexport serve` options)."""

    max_tokens: int  # the build's max_new_tokens
    max_images: int  # the build's max_images
    max_image_pixels: int = 16_000_000  # width x height of one image, checked before it is decoded
    max_image_bytes: int = 20 * 1024 * 1024  # one fetched or local image file
    local_media: Path | None = None  # file:// URLs only below this directory
    remote_images: bool = False  # fetch http(s) image URLs
    fetch_timeout: float = 10.0


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # the chat template's form: image parts as {"type": "image"}
    images: list[Any]  # PIL images, in the order of their parts
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None
    extra: dict[str, Any] = field(default_factory=dict)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _number(body: dict, key: str, lo: float, hi: float, kind=float, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo:g} and {hi:g}, got {v}", key)
    return kind(v)


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 31, int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 31, int)
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this model's limit of {limits.max_tokens} new tokens", "max_tokens")
    # temperature defaults to 0 (greedy), as `mmexport run`: the answers of a build are reproducible
    temperature = _number(body, "temperature", 0.0, 2.0, default=0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, default=1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    top_k = _number(body, "top_k", 0, 1 << 31, int, default=0)  # an extension, as vLLM's
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, int)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    messages, images = [], []
    for i, m in enumerate(msgs):
        messages.append(_message(m, i, images, limits))
    if len(images) > limits.max_images:
        raise ApiError(400, f"{len(images)} images in the prompt; this model takes at most {limits.max_images}", "messages")
    return ChatRequest(
        messages=messages,
        images=images,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=None if seed is None else seed % (1 << 64)),
        stop=[s for s in stop if s],
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        model=body.get("model"),
    )


def _message(m: Any, i: int, images: list[Any], limits: Limits) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
        raise ApiError(400, f"{where}: needs a role of system, developer, user or assistant", where)
    role, content = _ROLES[m["role"]], m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of content parts", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{where}: images are accepted in user messages only", f"{where}.content[{j}]")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.content[{j}].image_url.url must be a string", f"{where}.content[{j}]")
            if len(images) >= limits.max_images:
                raise ApiError(400, f"more than {limits.max_images} images in the prompt; this model takes at most {limits.max_images}", "messages")
            images.append(load_image_url(url, limits))
            parts.append({"type": "image"})
        else:
            raise ApiError(400, f"{where}.content[{j}]: unsupported content part (text and image_url are)", f"{where}.content[{j}]")
    return {"role": role, "content": parts}


# -- images ---------------------------------------------------------------------------------------
def load_image_url(url: str, limits: Limits):
    """A PIL image from a data: URL (base64), a file:// URL below the allowed directory, or http(s) if allowed."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "image data: URLs must be base64 (data:image/...;base64,...)", "image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data: URL is not valid base64", "image_url") from None
    elif scheme == "file":
        data = _local_file(urllib.parse.unquote(urllib.parse.urlparse(url).path), limits)
    elif scheme in ("http", "https"):
        if not limits.remote_images:
            raise ApiError(400, "image URLs over http(s) are not fetched by this server (start it with --allow-remote-images); "
                                "send the image as a base64 data: URL", "image_url")
        data = _fetch(url, limits)
    else:
        raise ApiError(400, "image_url must be a data: URL" + (", a file:// URL" if limits.local_media else "")
                       + (" or an http(s) URL" if limits.remote_images else ""), "image_url")
    return decode_image(data, limits)


def decode_image(data: bytes, limits: Limits):
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise ApiError(400, f"an image of {len(data)} bytes; the limit is {limits.max_image_bytes}", "image_url")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size  # from the header: nothing decoded yet
        if w * h > limits.max_image_pixels:
            raise ApiError(400, f"an image of {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels}", "image_url")
        im.load()
        return im
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"not a decodable image ({str(e).strip() or type(e).__name__})", "image_url") from None


def _local_file(path: str, limits: Limits) -> bytes:
    if limits.local_media is None:
        raise ApiError(400, "file:// image URLs are not allowed by this server (start it with --allowed-local-media DIR)", "image_url")
    root = limits.local_media.resolve()
    p = Path(path).resolve()
    if not p.is_relative_to(root):
        raise ApiError(403, f"{path}: outside the directory this server may read images from", "image_url", type="permission_error")
    if not p.is_file():
        raise ApiError(400, f"{path}: no such image file", "image_url")
    if p.stat().st_size > limits.max_image_bytes:
        raise ApiError(400, f"{path}: larger than {limits.max_image_bytes} bytes", "image_url")
    return p.read_bytes()


def _fetch(url: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mmexport"}), timeout=limits.fetch_timeout) as r:
            data = r.read(limits.max_image_bytes + 1)
    except Exception as e:
        raise ApiError(400, f"could not fetch the image: {type(e).__name__}: {e}".splitlines()[0], "image_url") from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(400, f"the image at {url} is larger than {limits.max_image_bytes} bytes", "image_url")
    return data


# -- responses ------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }


def chunk(cid: str, model: str, created: int, delta: dict[str, Any] | None, finish: str | None = None,
          usage: dict[str, int] | None = None, with_usage: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk`: a delta of choice 0, or (delta None) the closing usage-only chunk."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if with_usage:
        out["usage"] = usage
    return out
