"""`mmexport triton`, for real: the repository it writes is served by the `tritonserver` binary and Python
backend that nvidia-pytriton's wheel carries (CPU only, loopback), queried with tritonclient over gRPC
(streamed and not) and HTTP (KServe v2 `infer` on a --no-decoupled model, and Triton's generate /
generate_stream endpoints). Answers must be `mmexport run`'s tokens. The backend's Python runs with torch
and transformers unimportable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, free_port, run_cli, stop_process, wait_http


def _tritonserver() -> Path:
    spec = importlib.util.find_spec("pytriton")
    assert spec and spec.submodule_search_locations, "nvidia-pytriton is a test dependency (pip install -e '.[test]')"
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


@pytest.fixture(scope="module")
def triton(tiny_artifacts, torch_blocked, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    # a copy of the session's build: the repository hard-links its files, and the other tests' onnx.checker
    # refuses external data with several links
    build = root / "qwen2-vl-tiny"
    shutil.copytree(tiny_artifacts, build)
    out = run_cli("triton", build, "--out", repo).stdout.strip()
    assert Path(out) == repo / "qwen2-vl-tiny" and (repo / "qwen2-vl-tiny" / "1" / "artifact" / "manifest.json").is_file()
    run_cli("triton", build, "--out", repo, "--name", "tiny-sync", "--no-decoupled", "--instances", "2", "--max-batch", "4")
    cfg = (repo / "tiny-sync" / "config.pbtxt").read_text()
    assert "decoupled: false" in cfg and "count: 2" in cfg and 'string_value: "4"' in cfg
    # the wheel's Python backend, with the stub built for this interpreter's Python version
    ts = _tritonserver()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (ts / "backends" / "python").iterdir():
        if f.is_file():
            (backend / f.name).symlink_to(f)
    (backend / "triton_python_backend_stub").symlink_to(ts / "python_backend_stubs" / ver / "triton_python_backend_stub")
    http, grpc = free_port(), free_port()
    site = sysconfig.get_paths()["purelib"]
    env = {
        **os.environ,
        # the wheel's shared libraries, and this interpreter's libpython for the stub
        "LD_LIBRARY_PATH": os.pathsep.join([str(ts.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]),
        "PYTHONHOME": sys.base_prefix,
        "PYTHONPATH": os.pathsep.join([str(torch_blocked), str(REPO), site]),
    }
    log = open(root / "tritonserver.log", "w")
    proc = subprocess.Popen(
        [str(ts / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(root / "backends"),
         "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
         "--allow-metrics", "false", "--exit-timeout-secs", "20"],
        cwd=ts, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{http}/v2/health/ready", timeout=120, proc=proc)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "log": root / "tritonserver.log"}
    finally:
        stop_process(proc, 60)
        log.close()


def _inputs(mod, text: str, images=(), max_tokens: int = 16, stream: bool | None = None):
    def tensor(name, arr, dtype):
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    ins = [tensor("text_input", np.array([text.encode()], dtype=np.object_), "BYTES"),
           tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32")]
    if images:
        ins.append(tensor("image_bytes_input", np.array([Path(p).read_bytes() for p in images], dtype=np.object_), "BYTES"))
    if stream is not None:
        ins.append(tensor("stream", np.array([stream]), "BOOL"))
    return ins


def _grpc_stream(url: str, model: str, inputs) -> tuple[list[int], str, int]:
    """(token ids, text, responses) of one request over a gRPC stream."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        ids, text, n = [], [], 0
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                raise error
            toks = result.as_numpy("token_ids")
            if toks is not None:
                n += 1
                ids += toks.tolist()
                text += [t.decode() for t in result.as_numpy("text_output")]
            if result.get_response().parameters["triton_final_response"].bool_param:
                return ids, "".join(text), n
    finally:
        client.stop_stream()
        client.close()


def test_grpc_streams_the_tokens_of_mmexport_run(triton, tiny_artifacts, images):
    import tritonclient.grpc as grpcclient

    ref = json.loads(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe the image.", "--max-new-tokens", "24", "--json").stdout)
    ids, text, n = _grpc_stream(triton["grpc"], "qwen2-vl-tiny", _inputs(grpcclient, "Describe the image.", [images[0]], 24, True))
    assert ids == ref["token_ids"] and text == ref["text"] and n == len(ids)
    # not streamed: one response with everything
    ids, text, n = _grpc_stream(triton["grpc"], "qwen2-vl-tiny", _inputs(grpcclient, "Describe the image.", [images[0]], 24, False))
    assert ids == ref["token_ids"] and text == ref["text"] and n == 1


def test_http_infer_and_generate_endpoints(triton, tiny_artifacts, images):
    import httpx
    import tritonclient.http as httpclient

    from mmexport.runtime.pipeline import Pipeline

    pipe = Pipeline(tiny_artifacts)
    try:
        ref2 = pipe.generate("Compare the pictures.", [str(images[1]), str(images[2])], max_new_tokens=20)
        ref_text = pipe.generate("Hello there", max_new_tokens=12)
    finally:
        pipe.close()
    # KServe v2 infer over HTTP (the --no-decoupled model): two images, several requests at once
    client = httpclient.InferenceServerClient(triton["http"], concurrency=4)
    pending = [client.async_infer("tiny-sync", _inputs(httpclient, "Compare the pictures.", [images[1], images[2]], 20)) for _ in range(4)]
    for p in pending:
        r = p.get_result()
        assert r.as_numpy("token_ids").tolist() == ref2.token_ids and r.as_numpy("text_output")[0].decode() == ref2.text
    with pytest.raises(Exception, match="max_tokens must be 1..64"):
        client.infer("tiny-sync", _inputs(httpclient, "Hello", max_tokens=1000))
    client.close()
    # Triton's generate extension on the decoupled model: JSON in, one answer or server-sent events out
    base = f"http://{triton['http']}/v2/models/qwen2-vl-tiny"
    r = httpx.post(base + "/generate", json={"text_input": "Hello there", "max_tokens": 12, "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json()["token_ids"] == ref_text.token_ids and r.json()["text_output"] == ref_text.text
    events = []
    with httpx.stream("POST", base + "/generate_stream", json={"text_input": "Hello there", "max_tokens": 12}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["token_ids"] for e in events] == ref_text.token_ids
    assert "".join(e["text_output"] for e in events) == ref_text.text


def test_triton_repository_is_not_written_over_foreign_files(tiny_artifacts, tmp_path):
    (tmp_path / "qwen2-vl-tiny").mkdir()
    (tmp_path / "qwen2-vl-tiny" / "config.pbtxt").write_text('name: "mine"\n')
    p = run_cli("triton", tiny_artifacts, "--out", tmp_path, check=2)
    assert "--force" in p.stderr
    p = run_cli("triton", tiny_artifacts, "--out", tmp_path, "--force", check=2)
    assert "not written by `mmexport triton`" in p.stderr
    assert (tmp_path / "qwen2-vl-tiny" / "config.pbtxt").read_text() == 'name: "mine"\n'
