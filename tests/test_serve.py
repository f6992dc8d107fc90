"""`mmexport serve`, for real: the CLI starts uvicorn on a free loopback port (torch and transformers made
unimportable in the server's process), the official `openai` client and plain HTTP talk to it.

Every answer is compared with the same request answered alone by the runtime (`Pipeline.generate`, the
`mmexport run` path; one case through the `mmexport run` CLI itself), whatever else the server is running.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from conftest import REPO, free_port, run_cli, stop_process, wait_http

KEY = "sk-mmexport-test"


@contextmanager
def server(artifacts: Path, blocked: Path, *args: str):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{REPO}", "MMEXPORT_API_KEY": ""}
    log = tempfile.NamedTemporaryFile("w+", prefix="mmexport-serve-", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-m", "mmexport", "serve", str(artifacts), "--port", str(port), *args],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    proc.log = lambda: Path(log.name).read_text()
    try:
        wait_http(base + "/health", proc=proc)
        proc.base = base
        yield proc
    finally:
        stop_process(proc)
        log.close()


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(text: str, *imgs: Path, url=data_url) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": url(p)}} for p in imgs), {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def refs():
    """Solo answers: the runtime alone, one request at a time, rendered as the server renders messages."""
    from mmexport.runtime.pipeline import Pipeline

    pipes: dict[Path, Pipeline] = {}

    def answer(artifacts: Path, messages: list[dict], images: list[Path], max_tokens: int, stop=()):
        pipe = pipes.get(artifacts) or pipes.setdefault(artifacts, Pipeline(artifacts))
        if len(messages) == 1 and isinstance(messages[0]["content"], list):  # one user turn: exactly `mmexport run`
            text = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
            return pipe.generate(text, [str(p) for p in images], max_new_tokens=max_tokens, stop=stop)
        tmpl = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
        return pipe.generate(pipe.prompts.render(tmpl), [str(p) for p in images], max_new_tokens=max_tokens, raw_prompt=True, stop=stop)

    yield answer
    for p in pipes.values():
        p.close()


def _finish(ref) -> str:
    return "length" if ref.stop_reason == "length" else "stop"


def _ask(client, model, messages, max_tokens, stream, **kw):
    """(text, finish_reason, usage) through the openai client, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = [], None, None
    for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        if ch.choices:
            text.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    return "".join(text), finish, usage


def _concurrent(fns):
    """Run the callables at once (a barrier lines them up); their results or exceptions, in order."""
    out = [None] * len(fns)
    gate = threading.Barrier(len(fns))

    def run(i):
        gate.wait()
        try:
            out[i] = fns[i]()
        except Exception as e:  # reported by the caller's assertions
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _post_in_background(url: str, body: dict, n: int):
    """n POSTs in threads; (threads, results): a response, or the transport error of one that found the
    listener closed."""
    res: list = [None] * n

    def post(i):
        try:
            res[i] = httpx.post(url, json=body, timeout=120)
        except httpx.TransportError as e:
            res[i] = e

    workers = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in workers:
        t.start()
    return workers, res


def _metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_openai_clients_at_once_get_their_solo_answers(tiny_artifacts, images, torch_blocked, refs, tmp_path):
    with server(tiny_artifacts, torch_blocked, "--api-key", KEY) as srv:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        assert model == "qwen2-vl-tiny"
        cases = [  # (messages, images, max_tokens, stream)
            ([user("Describe the image.", images[0])], [images[0]], 40, True),
            ([user("Hello, who are you?")], [], 40, False),
            ([user("Compare the two pictures.", images[1], images[2])], [images[1], images[2]], 40, True),
            ([{"role": "system", "content": "You are terse."}, user("What is it?", images[0]),
              {"role": "assistant", "content": "A picture of noise."}, {"role": "user", "content": "Tell me more."}], [images[0]], 40, False),
            ([user("Count to ten.")], [], 10, True),
            ([user("What colour dominates?", images[2])], [images[2]], 32, False),
            ([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Where is the cat?"}], [], 40, True),
            ([user("Is this bigger?", images[1])], [images[1]], 24, True),
            ([user("Say something.")], [], 40, False),
            ([user("Describe both.", images[0], images[1]), {"role": "assistant", "content": "Two images."},
              user("And now this one?", images[2])], [images[0], images[1], images[2]], 40, True),
        ]
        expected = [refs(tiny_artifacts, m, im, n) for m, im, n, _ in cases]
        got = _concurrent([lambda c=c: _ask(client, model, c[0], c[2], c[3]) for c in cases])
        for i, (res, ref) in enumerate(zip(got, expected)):
            assert not isinstance(res, Exception), f"case {i}: {res!r}"
            text, finish, usage = res
            assert text == ref.text, f"case {i}"
            assert finish == _finish(ref), f"case {i}"
            assert (usage.prompt_tokens, usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids)), f"case {i}"
        # the requests were decoded together: some decoder steps served several of them
        steps = _metric(srv.base, "mmexport_decode_batch_rows_count")
        assert steps > 0 and _metric(srv.base, 'mmexport_decode_batch_rows_bucket{le="1.0"}') < steps
        assert _metric(srv.base, 'mmexport_requests_total{status="length"}') + _metric(srv.base, 'mmexport_requests_total{status="stop"}') == len(cases)
        metrics = httpx.get(srv.base + "/metrics").text
        for name in ("mmexport_queue_depth", "mmexport_time_to_first_token_seconds_bucket", "mmexport_time_per_output_token_seconds_bucket",
                     "mmexport_generated_tokens_total", "mmexport_running_requests"):
            assert name in metrics
        assert _metric(srv.base, "mmexport_generated_tokens_total") == sum(len(r.token_ids) for r in expected)

        # one case against the `mmexport run` command itself, and a stop string
        cli = json.loads(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe the image.", "--max-new-tokens", "40", "--json").stdout)
        assert got[0][0] == cli["text"]
        ref = expected[1]
        if len(ref.text) >= 6:
            stop = ref.text[3:6]
            r = client.chat.completions.create(model=model, messages=cases[1][0], max_tokens=40, stop=[stop])
            assert r.choices[0].message.content == ref.text[: ref.text.find(stop)] and r.choices[0].finish_reason == "stop"
        # sampling: a seed reproduces the same answer
        kw = dict(temperature=0.9, top_p=0.9, seed=7)
        a = _ask(client, model, cases[1][0], 20, False, **kw)[0]
        assert a == _ask(client, model, cases[1][0], 20, True, **kw)[0]


@contextmanager
def image_host(directory: Path):
    """A loopback HTTP server for the test images (for --allow-remote-images)."""
    import functools
    import http.server

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_method_b_build_serves_mixed_batches(mllama_artifacts, images, torch_blocked, refs):
    with server(mllama_artifacts, torch_blocked, "--allow-remote-images") as srv, image_host(images[0].parent) as host:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        remote = lambda p: f"{host}/{p.name}"  # noqa: E731
        cases = [
            ([user("Describe the image.", images[0])], [images[0]], 32, True),  # different tile layouts per row
            ([user("Hello there.")], [], 32, False),  # text-only row: has_image 0
            ([user("Compare them.", images[1], images[2])], [images[1], images[2]], 32, True),
            ([user("What is wide?", images[1])], [images[1]], 24, False),
            ([user("Count to five.")], [], 32, True),
            ([user("What is this?", images[2])], [images[2]], 32, False),
            ([user("One more.", images[0], images[1])], [images[0], images[1]], 32, True),
            ([{"role": "system", "content": "Be brief."}, user("Hi.")], [], 32, False),
            ([user("Fetched from a URL.", images[1], url=remote)], [images[1]], 32, True),
        ]
        expected = [refs(mllama_artifacts, m, im, n) for m, im, n, _ in cases]
        got = _concurrent([lambda c=c: _ask(client, "llama-3.2-vision-tiny", c[0], c[2], c[3]) for c in cases])
        for i, (res, ref) in enumerate(zip(got, expected)):
            assert not isinstance(res, Exception), f"case {i}: {res!r}"
            assert res[0] == ref.text and res[1] == _finish(ref), f"case {i}"
        steps = _metric(srv.base, "mmexport_decode_batch_rows_count")
        assert _metric(srv.base, 'mmexport_decode_batch_rows_bucket{le="1.0"}') < steps


def test_limits_and_errors_in_openai_format(tiny_artifacts, images, torch_blocked, refs, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.png").write_bytes(images[0].read_bytes())
    with server(tiny_artifacts, torch_blocked, "--api-key", KEY, "--allowed-local-media", str(media),
                "--max-image-pixels", "70000", "--max-body-mb", "1") as srv:
        base = srv.base
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        m = "qwen2-vl-tiny"
        health = httpx.get(base + "/health").json()
        assert health["status"] == "ready" and health["slots"] == 8
        models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert models["data"][0]["id"] == m and models["data"][0]["max_model_len"] == 512

        def err(exc_type, status, **kw):
            with pytest.raises(exc_type) as e:
                client.chat.completions.create(model=kw.pop("model", m), **{"max_tokens": 8, **kw})
            assert e.value.status_code == status
            body = e.value.body
            assert set(body) == {"message", "type", "param", "code"} and body["message"]
            return body

        # API key
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
                model=m, messages=[user("hi")], max_tokens=4)
        assert e.value.body["code"] == "invalid_api_key"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [user("hi")]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # request shape and limits
        err(openai.BadRequestError, 400, messages=[user("hi")], n=2)
        err(openai.BadRequestError, 400, messages=[user("hi")], max_tokens=65)
        err(openai.BadRequestError, 400, messages=[])
        err(openai.NotFoundError, 404, messages=[user("hi")], model="gpt-4o")
        body = err(openai.BadRequestError, 400, messages=[user("hi", *([images[0]] * 5))])
        assert "at most 4" in body["message"]
        body = err(openai.BadRequestError, 400, messages=[user("hi", images[2])])  # 300x240 > 70,000 pixels
        assert "pixels" in body["message"]
        body = err(openai.BadRequestError, 400, messages=[user("word " * 600)])
        assert body["code"] == "context_length_exceeded"
        body = err(openai.BadRequestError, 400, messages=[user("hi", images[0], url=lambda p: "http://127.0.0.1:9/x.png")])
        assert "--allow-remote-images" in body["message"]
        err(openai.BadRequestError, 400, messages=[user("hi", images[0], url=lambda p: "data:image/png;base64,@@@")])
        err(openai.PermissionDeniedError, 403, messages=[user("hi", images[1], url=lambda p: f"file://{p}")])
        big = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (1 << 20)}}
        err(openai.APIStatusError, 413, messages=[{"role": "user", "content": [big]}])
        r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(base + "/v1/nothing").json()["error"]["code"] == "not_found"
        # a local file below the allowed directory is served like the same image sent inline
        ok = client.chat.completions.create(model=m, messages=[user("Describe.", media / "ok.png", url=lambda p: f"file://{p}")], max_tokens=16)
        assert ok.choices[0].message.content == refs(tiny_artifacts, [user("Describe.")], [images[0]], 16).text
        assert _metric(base, 'mmexport_requests_total{status="rejected"}') >= 13


def test_queue_full_disconnect_and_graceful_shutdown(tiny_artifacts, images, torch_blocked, refs):
    msgs = [user("Describe the image.", images[2])]
    ref = refs(tiny_artifacts, msgs, [images[2]], 64)
    body = {"model": "qwen2-vl-tiny", "messages": msgs, "max_tokens": 64}
    with server(tiny_artifacts, torch_blocked, "--max-batch", "1", "--max-queue", "3") as srv:
        url = srv.base + "/v1/chat/completions"
        # 24 at once on one slot and three places in the queue: the rest are told to come back
        res = _concurrent([lambda: httpx.post(url, json=body, timeout=120) for _ in range(24)])
        codes = [r.status_code for r in res]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
        for r in res:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["message"]["content"] == ref.text

        # a streaming client that goes away: its request is cancelled and its place freed
        cancelled0 = _metric(srv.base, 'mmexport_requests_total{status="cancelled"}')
        ahead = [threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body, "timeout": 120}) for _ in range(3)]
        for t in ahead:
            t.start()
        time.sleep(0.05)
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        for t in ahead:
            t.join(120)
        end = time.monotonic() + 30
        while _metric(srv.base, 'mmexport_requests_total{status="cancelled"}') < cancelled0 + 1 and time.monotonic() < end:
            time.sleep(0.1)
        assert _metric(srv.base, 'mmexport_requests_total{status="cancelled"}') == cancelled0 + 1
        h = httpx.get(srv.base + "/health").json()
        assert h["running"] == 0 and h["queued"] == 0

        # SIGTERM with requests in flight: they finish, then the process ends
        workers, res = _post_in_background(url, body, 4)
        end = time.monotonic() + 10
        while httpx.get(srv.base + "/health").json().get("running", 0) == 0 and time.monotonic() < end:
            time.sleep(0.005)
        srv.send_signal(signal.SIGTERM)
        for t in workers:
            t.join(120)
        # after its graceful shutdown uvicorn re-raises the signal, which the CLI turns into its exit code 143
        assert srv.wait(60) in (0, 143, -signal.SIGTERM)
        done = [r for r in res if isinstance(r, httpx.Response)]
        assert done and all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text for r in done)
        assert "Application shutdown complete" in srv.log()


def test_serve_refuses_more_rows_than_the_build(tiny_artifacts):
    p = run_cli("serve", tiny_artifacts, "--max-batch", "9", check=2)
    assert p.stderr.count("\n") == 1 and "at most 8 rows" in p.stderr


def test_shutdown_cancels_what_outlasts_the_timeout(tiny_artifacts, images, torch_blocked, refs):
    msgs = [user("Describe the image.", images[2])]
    ref = refs(tiny_artifacts, msgs, [images[2]], 64)
    body = {"model": "qwen2-vl-tiny", "messages": msgs, "max_tokens": 64}
    with server(tiny_artifacts, torch_blocked, "--max-batch", "1", "--max-queue", "60", "--shutdown-timeout", "1") as srv:
        url = srv.base + "/v1/chat/completions"
        workers, res = _post_in_background(url, body, 60)
        end = time.monotonic() + 60

        def finished() -> float:  # whole answers so far (a loaded machine may take seconds for the first)
            return _metric(srv.base, 'mmexport_requests_total{status="length"}') + _metric(srv.base, 'mmexport_requests_total{status="stop"}')

        while (httpx.get(srv.base + "/health").json().get("queued", 0) < 5 or finished() < 1) and time.monotonic() < end:
            time.sleep(0.01)
        t0 = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(30) in (0, 143, -signal.SIGTERM)
        stopped = time.monotonic() - t0
        for t in workers:
            t.join(60)
        ok = [r for r in res if isinstance(r, httpx.Response) and r.status_code == 200]
        cut = [r for r in res if not (isinstance(r, httpx.Response) and r.status_code == 200)]
        # one slot, 60 requests: those finished within the second are whole answers, the rest are told 503
        assert ok and cut and stopped < 15, (len(ok), len(cut), stopped)
        assert all(r.json()["choices"][0]["message"]["content"] == ref.text for r in ok)
        assert all(isinstance(r, httpx.Response) and r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
                   for r in cut), [getattr(r, "text", r) for r in cut][:3]
        assert "Exception in ASGI application" not in srv.log()
