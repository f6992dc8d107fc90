"""Shared fixtures: an isolated cache, the CLI as a subprocess, and one tiny build per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The longest test files (seconds in one process, measured: shapes_model 216, hardening 84, qwen3_vl 83, mllama 61,
# generic_decoder 60, precision 56; the other files 45 or less). pytest-xdist (--dist loadfile) hands files to the
# workers in collection order, so these go first and the last files to start are short: alphabetically,
# test_shapes_model started near the end and its worker finished minutes after the other.
_LONGEST_FIRST = ("test_shapes_model.py", "test_hardening.py", "test_qwen3_vl.py", "test_mllama.py",
                  "test_generic_decoder.py", "test_precision.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay together, in order


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mmexport-cache")
    os.environ["MMEXPORT_CACHE"] = str(d)  # synthetic checkpoints never land in the user's home
    return d


def run_cli(*args: str, env: dict | None = None, check: int | None = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m mmexport ARGS` the way a user runs the command; assert its exit code."""
    e = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})}
    p = subprocess.run([sys.executable, "-m", "mmexport", *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout, cwd=REPO)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode} != {check}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.fixture(scope="session")
def tiny_artifacts(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "qwen2-vl-tiny"
    run_cli("build", "qwen2-vl-tiny", "--out", out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir) -> Path:
    """The tiny recipe's synthetic checkpoint: an ordinary local Hugging Face directory."""
    from mmexport.families import get_adapter
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    r = load_recipe("qwen2-vl-tiny")
    d, _ = resolve_source(r, None, get_adapter(r.family), log=lambda m: None)
    return d


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Three images of odd, different sizes and formats."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w, ext) in enumerate(((123, 77, "png"), (64, 201, "jpg"), (300, 240, "png"))):
        p = d / f"img{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def mllama_artifacts(cache_dir, tmp_path_factory) -> Path:
    """The tiny Method B (mllama) recipe, built once per session."""
    out = tmp_path_factory.mktemp("build") / "llama-3.2-vision-tiny"
    run_cli("build", "llama-3.2-vision-tiny", "--out", out)
    return out


@pytest.fixture(scope="session")
def torch_blocked(tmp_path_factory) -> Path:
    """A directory that, first on PYTHONPATH, makes `import torch` / `import transformers` fail."""
    block = tmp_path_factory.mktemp("block")
    for mod in ("torch", "transformers"):
        (block / mod).mkdir()
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    return block


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200 (bounded); fail early if `proc` exits."""
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server this test started (it shuts down gracefully), SIGKILL it past `timeout`."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
