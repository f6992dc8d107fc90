"""The Qwen2-VL slice end to end through the real CLI: build, inspect, run, verify, and every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from conftest import run_cli


def test_recipes_lists_both_qwen_recipes(cache_dir):
    p = run_cli("recipes", "--json")
    names = {r["name"]: r for r in json.loads(p.stdout)}
    assert {"qwen2-vl-tiny", "qwen2-vl-2b"} <= set(names)
    assert names["qwen2-vl-2b"]["source"] == "Qwen/Qwen2-VL-2B-Instruct"


def test_build_writes_checked_graphs_and_manifest(tiny_artifacts):
    m = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["family"] == "qwen2_vl" and m["precision"] == "fp32"
    assert set(m["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    data_files = [f for c in m["components"].values() for f in c["data_files"]]
    assert len(data_files) == len(set(data_files)) == 4  # one uniquely named weights file per graph
    for name, c in m["components"].items():
        path = tiny_artifacts / c["file"]
        onnx.checker.check_model(str(path))
        g = onnx.load(str(path), load_external_data=False).graph
        assert [i.name for i in g.input] == [t["name"] for t in c["spec"]["inputs"]]
        assert [o.name for o in g.output] == [t["name"] for t in c["spec"]["outputs"]]
    dec = m["components"]["decoder"]["spec"]
    assert dec["inputs"][1]["shape"] == [3, "batch", "seq_len"]  # M-RoPE positions
    assert set(dec["profiles"]) == {"prefill", "decode"}
    for key in ("image", "vision", "text", "tokens"):
        assert key in m["model"]
    assert m["model"]["text"]["mrope_section"] == [4, 6, 2]
    assert {"torch", "transformers", "onnx"} <= set(m["versions"])
    assert m["source"]["kind"] == "synthetic" and len(m["source"]["weights_sha256"]) == 64
    assert (tiny_artifacts / m["tokenizer"]["chat_template"]).is_file()
    assert not list(tiny_artifacts.parent.glob(".*building*"))  # the temporary build dir is gone
    import os, stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(tiny_artifacts.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in tiny_artifacts.rglob("*") if p.is_file())


def test_build_refuses_to_overwrite_without_force(tiny_artifacts):
    p = run_cli("build", "qwen2-vl-tiny", "--out", tiny_artifacts, check=2)
    assert "already exists" in p.stderr and "--force" in p.stderr


def test_inspect_shows_components(tiny_artifacts):
    p = run_cli("inspect", tiny_artifacts)
    for name in ("vision_encoder", "projector", "embed_tokens", "decoder", "position_ids", "prefill", "decode"):
        assert name in p.stdout


def test_verify_tiny_passes_with_fp32_bounds(tiny_artifacts):
    p = run_cli("verify", tiny_artifacts, "--json")
    rep = json.loads(p.stdout)
    assert rep["passed"] and rep["failures"] == []
    assert json.loads((tiny_artifacts / "verify.json").read_text())["passed"]
    stages = {(c["case"].split("[")[0], c["name"]) for c in rep["comparisons"]}
    for stage in ("vision_encoder", "projector", "embed_tokens", "decoder", "first-token logits"):
        assert ("images", stage) in stages
    assert ("text-only", "decoder") in stages
    for c in rep["comparisons"]:
        assert c["finite"] and c["max_abs"] <= 1e-4, c
    greedy = [c for c in rep["checks"] if c["name"].startswith("greedy")]
    assert len(greedy) == 2
    for c in greedy:
        assert c["data"]["ours"] == c["data"]["transformers"] and len(c["data"]["ours"]) > 0


def test_run_json_multi_image(tiny_artifacts, images):
    p = run_cli("run", tiny_artifacts, "--image", images[0], "--image", images[1], "--image", images[2],
                "--prompt", "What differs between these?", "--max-new-tokens", "6", "--json")
    r = json.loads(p.stdout)
    assert len(r["token_ids"]) == r["generated_tokens"] <= 6
    assert r["prompt_tokens"] > 3 * 4  # three images' tokens at least
    assert set(r["timings_ms"]) >= {"preprocess", "vision", "prefill", "decode"}
    assert r["tokens_per_s"] >= 0 and isinstance(r["text"], str)


def test_run_is_deterministic_and_sampling_is_seeded(tiny_artifacts, images):
    args = ("run", tiny_artifacts, "--image", images[0], "--prompt", "Hi", "--max-new-tokens", "8", "--json")
    a, b = (json.loads(run_cli(*args).stdout) for _ in range(2))
    assert a["token_ids"] == b["token_ids"]
    s = ("--temperature", "1.5", "--top-k", "50", "--top-p", "0.95")
    s1 = json.loads(run_cli(*args, *s, "--seed", "1").stdout)["token_ids"]
    s1b = json.loads(run_cli(*args, *s, "--seed", "1").stdout)["token_ids"]
    s2 = json.loads(run_cli(*args, *s, "--seed", "2").stdout)["token_ids"]
    assert s1 == s1b and s1 != s2


def test_run_streams_text_to_stdout_and_stats_to_stderr(tiny_artifacts, images):
    p = run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe.", "--max-new-tokens", "5")
    j = json.loads(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe.", "--max-new-tokens", "5", "--json").stdout)
    assert p.stdout.rstrip("\n") == j["text"]
    assert "prompt tokens" in p.stderr


def test_stop_string_truncates(tiny_artifacts, images):
    base = ("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe.", "--max-new-tokens", "12", "--json")
    full = json.loads(run_cli(*base).stdout)
    text = full["text"]
    if len(text) < 4:
        pytest.skip("the random model produced too little text to cut")
    stop = text[2:4]
    cut = json.loads(run_cli(*base, "--stop", stop).stdout)
    assert cut["stop_reason"] == "stop" and cut["text"] == text[: text.find(stop)]


def test_run_works_with_torch_and_transformers_unimportable(tiny_artifacts, images, tmp_path):
    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    from conftest import REPO

    env = {"PYTHONPATH": f"{block}:{REPO}"}
    p = run_cli("run", tiny_artifacts, "--image", images[1], "--prompt", "Describe.", "--max-new-tokens", "4", "--json", env=env)
    assert len(json.loads(p.stdout)["token_ids"]) >= 1
    # and the runtime package really does not import them
    import subprocess, sys

    # every family's runtime (from the one registry), the runtime, the server and the CLI: no torch, no
    # transformers, and none of the export or engine-building code (the TensorRT runner reads the manifest
    # and engine metadata modules both sides share)
    code = "import sys, importlib; from mmexport.families import all_families; " \
           "[importlib.import_module(f.runtime.split(':')[0]) for f in all_families()]; " \
           "import mmexport.runtime.pipeline, mmexport.runtime.backends, mmexport.runtime.batch, " \
           "mmexport.tasks.shapes, mmexport.cli, mmexport.serve.engine, mmexport.serve.app, " \
           "mmexport.serve.openai_api, mmexport.serve.metrics, mmexport.serve.bench, mmexport.serve.triton; " \
           "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers') or m.startswith(('mmexport.export', 'mmexport.engines'))]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO)})


def test_local_checkpoint_through_model_option(tiny_checkpoint, tmp_path):
    local = tmp_path / "my-qwen2-vl"
    shutil.copytree(tiny_checkpoint, local)
    out = tmp_path / "art"
    run_cli("build", "qwen2-vl-2b", "--model", local, "--out", out, "--precision", "fp32")
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == {**m["source"], "kind": "local", "path": str(local.resolve())}
    assert m["recipe"]["name"] == "qwen2-vl-2b"
    rep = json.loads(run_cli("verify", out, "--json", "--tokens", "8").stdout)
    assert rep["passed"], rep["failures"]


# -- bad input: one line on stderr, exit 2 -----------------------------------------------------------
def _one_line_error(p, *needles):
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_unknown_recipe(cache_dir):
    _one_line_error(run_cli("build", "no-such-recipe", check=2), "unknown recipe", "qwen2-vl-tiny")


def test_missing_and_non_image_files(tiny_artifacts, tmp_path):
    _one_line_error(run_cli("run", tiny_artifacts, "--image", tmp_path / "nope.png", "--prompt", "x", check=2), "image not found")
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    _one_line_error(run_cli("run", tiny_artifacts, "--image", fake, "--prompt", "x", check=2), "not an image file")


def test_truncated_image(tiny_artifacts, images, tmp_path):
    bad = tmp_path / "trunc.png"
    bad.write_bytes(images[2].read_bytes()[:300])
    _one_line_error(run_cli("run", tiny_artifacts, "--image", bad, "--prompt", "x", check=2), "not an image file")


def test_prompt_longer_than_context(tiny_artifacts):
    _one_line_error(run_cli("run", tiny_artifacts, "--prompt", "word " * 2000, check=2), "tokens", "context is 512")


def test_too_many_images(tiny_artifacts, images):
    args = [a for img in images + images[:2] for a in ("--image", img)]
    _one_line_error(run_cli("run", tiny_artifacts, *args, "--prompt", "x", check=2), "5 images", "at most 4")


def test_max_new_tokens_over_limit(tiny_artifacts):
    _one_line_error(run_cli("run", tiny_artifacts, "--prompt", "x", "--max-new-tokens", "100000", check=2), "limit")


def test_artifact_dir_problems(tiny_artifacts, tmp_path):
    _one_line_error(run_cli("run", tmp_path / "missing", "--prompt", "x", check=2), "not found")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken)
    (broken / "onnx" / "projector.onnx.data").unlink()
    _one_line_error(run_cli("run", broken, "--prompt", "x", check=2), "missing file onnx/projector.onnx.data")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_artifacts, tampered)
    with open(tampered / "onnx" / "decoder.onnx.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    _one_line_error(run_cli("run", tampered, "--prompt", "x", check=2), "decoder.onnx.data", "sha256")
    (tampered / "manifest.json").write_text("{not json")
    _one_line_error(run_cli("inspect", tampered, check=2), "corrupt manifest")


def test_checkpoint_of_another_architecture(tmp_path, cache_dir):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    _one_line_error(run_cli("build", "qwen2-vl-tiny", "--model", other, "--out", tmp_path / "o", check=2),
                    "llama", "qwen2_vl")
    assert not (tmp_path / "o").exists()


def test_verify_fails_with_exit_1_against_another_checkpoint(tiny_artifacts, tiny_checkpoint, tmp_path):
    """A build verified against different weights must fail (exit 1), not pass by construction."""
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "perturbed"
    shutil.copytree(tiny_checkpoint, other)
    w = load_file(str(other / "model.safetensors"))
    key = next(k for k in w if "layers.0.mlp.down_proj" in k and "visual" not in k)
    w[key] = w[key] + 0.05 * torch.randn_like(w[key])
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    p = run_cli("verify", tiny_artifacts, "--model", other, "--json", check=1)
    rep = json.loads(p.stdout)
    assert not rep["passed"]
    names = " ".join(rep["failures"])
    assert "source weights" in names and "decoder" in names


# -- TensorRT: engines, trtexec lines, lint, doctor (real TensorRT-RTX builder, no GPU needed) -----------
def test_engines_lint_doctor_commands(tiny_artifacts):
    pytest.importorskip("tensorrt_rtx_bindings")
    p = run_cli("engines", tiny_artifacts, "--json")
    meta = json.loads(p.stdout)
    assert meta["flavor"] == "tensorrt-rtx"
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    for name, c in meta["components"].items():
        assert c["engine_bytes"] > 0 and (Path(meta["engine_dir"]) / Path(c["engine"]).name).is_file(), name
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]
    lines = run_cli("engines", tiny_artifacts, "--print-trtexec").stdout
    assert lines.count("--onnx=onnx/") == 4 and "--profile=1" in lines and "--stronglyTyped" in lines
    lint = json.loads(run_cli("lint", tiny_artifacts, "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] == "error"]
    doc = json.loads(run_cli("doctor", "--json").stdout)
    assert doc["capabilities"]["can_build_engines"]["ok"] is True
    # without a GPU (or cuda-python) the trt backend says why, in one line
    if not doc["capabilities"]["can_run_engines"]["ok"]:
        _one_line_error(run_cli("run", tiny_artifacts, "--backend", "trt", "--prompt", "hi", check=2), "trt backend")


def test_raw_prompt_skips_the_chat_template(tiny_artifacts, images):
    templated = json.loads(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "Describe.", "--max-new-tokens", "2", "--json").stdout)
    raw = "<|vision_start|><|image_pad|><|vision_end|>Describe."
    r = json.loads(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", raw, "--raw-prompt", "--max-new-tokens", "2", "--json").stdout)
    # same image tokens, but none of the template's system/user/assistant framing
    assert 0 < r["prompt_tokens"] < templated["prompt_tokens"]
    _one_line_error(run_cli("run", tiny_artifacts, "--image", images[0], "--prompt", "no placeholder", "--raw-prompt", check=2),
                    "placeholders")


def test_unchanged_files_are_not_hashed_again_but_verify_rehashes(tiny_artifacts, tmp_path, monkeypatch):
    """.verified.json: a build's files are not read again on load while their size, mtime, ctime, inode and
    device are unchanged; a copy, an edit or a replaced file is hashed -- also an in-place edit that restores
    the old mtime (ctime cannot be set back); rehash=True (verify, run --rehash) hashes everything."""
    import os

    from mmexport.errors import UserError
    from mmexport.runtime import manifest as mf

    calls: list[int] = []
    real = mf.sha256_stream
    monkeypatch.setattr(mf, "sha256_stream", lambda f, *a, **k: (calls.append(1), real(f, *a, **k))[1])
    n_files = len(json.loads((tiny_artifacts / "manifest.json").read_text())["files"])

    mf.load_manifest(tiny_artifacts)  # the build recorded its hashes: nothing is read
    assert calls == []
    art = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, art)  # new inodes: everything is hashed once, then not again
    mf.load_manifest(art)
    assert len(calls) == n_files
    calls.clear()
    mf.load_manifest(art)
    assert calls == []
    mf.load_manifest(art, rehash=True)
    assert len(calls) == n_files

    data = art / "onnx" / "decoder.onnx.data"
    st = data.stat()
    with open(data, "r+b") as f:  # same size, new content...
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the old mtime: the ctime still moved
    assert (data.stat().st_size, data.stat().st_mtime_ns, data.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    calls.clear()
    with pytest.raises(UserError, match="decoder.onnx.data does not match its sha256"):
        mf.load_manifest(art)
    assert len(calls) >= 1
    with pytest.raises(UserError, match="decoder.onnx.data does not match"):  # the record was dropped
        mf.load_manifest(art, rehash=True)
