"""Method B end to end: the tiny Llama 3.2 Vision (mllama) recipe through build, run, verify, bench and
the TensorRT-RTX builder, against transformers' MllamaForConditionalGeneration."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def pipe(mllama_artifacts):
    from mmexport.runtime.pipeline import Pipeline

    p = Pipeline(mllama_artifacts)
    yield p
    p.close()


def test_build_declares_method_b_components(mllama_artifacts):
    m = json.loads((mllama_artifacts / "manifest.json").read_text())
    assert m["family"] == "mllama"
    assert set(m["components"]) == {"vision_encoder", "projector", "cross_kv", "embed_tokens", "decoder"}
    dec = {t["name"]: t for t in m["components"]["decoder"]["spec"]["inputs"]}
    cfg = json.loads(Path(m["source"]["path"], "config.json").read_text())
    cross = cfg["text_config"]["cross_attention_layers"]
    layers = cfg["text_config"]["num_hidden_layers"]
    # self-attention caches only for the self-attention layers, cross K/V only for the cross layers
    assert {n for n in dec if n.startswith("cache_key_")} == {f"cache_key_{i}" for i in range(layers) if i not in cross}
    assert {n for n in dec if n.startswith("cross_key_")} == {f"cross_key_{j}" for j in cross}
    assert dec["cross_attention_mask"]["shape"] == ["batch", "seq_len", "cross_tiles"]


def test_verify_passes_per_component_and_greedy(mllama_artifacts):
    p = run_cli("verify", mllama_artifacts, "--json", timeout=900)
    r = json.loads(p.stdout)
    assert r["passed"], r["failures"]
    names = {(c["case"].split("[")[0], c["name"]) for c in r["comparisons"]}
    for stage in ("preprocess", "vision_encoder", "projector"):
        assert ("images", stage) in names
    assert any(n.startswith("cross_kv cross_key_") for _, n in names)
    for case in ("images", "text-only"):
        assert (case, "decoder") in names and (case, "first-token logits") in names
        greedy = next(c for c in r["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and len(greedy["data"]["ours"]) > 0
    # the default images reach different tile layouts (the aspect-ratio embedding is exercised)
    tiles = [c["detail"] for c in r["checks"] if c["name"] == "tiles"]
    assert len(tiles) == 2 and tiles[0] != tiles[1]
    assert next(c for c in r["checks"] if c["name"] == "cross-attention mask")["passed"]


def test_decode_never_reruns_vision_or_cross_kv(pipe, images):
    r = pipe.generate("What is in the picture?", [images[0], images[1]], max_new_tokens=8, ignore_eos=True)
    assert len(r.token_ids) == 8
    assert r.calls["vision_encoder"] == 2 and r.calls["projector"] == 2  # one per image
    assert r.calls["cross_kv"] == 1  # once per request, for both images
    assert r.calls["decoder"] == 8 and r.calls["embed_tokens"] == 8  # prefill + 7 steps
    t = pipe.generate("Write one sentence about the sea.", [], max_new_tokens=4, ignore_eos=True)
    assert t.calls["vision_encoder"] == t.calls["cross_kv"] == 0


def test_images_change_the_answer_through_cross_attention(pipe, images):
    """The cross-attention path is live (random tanh gates, not transformers' zero init)."""
    from mmexport.runtime.pipeline import KVCache

    logits = []
    for img in (images[0], images[2]):
        prep = pipe.prepare("What is in the picture?", [img])
        state = pipe.encode_images(prep.images)
        logits.append(pipe.prefill(prep, state, KVCache(pipe.specs["decoder"])))
    assert np.abs(logits[0] - logits[1]).max() > 1e-2


def test_text_only_skips_cross_attention_layers(pipe):
    """has_image = 0 makes every cross-attention layer the identity: whatever the cross K/V hold."""
    from mmexport.runtime.pipeline import KVCache

    prep = pipe.prepare("Write one sentence about the sea.", [])
    state = pipe.encode_images([])
    base = pipe.prefill(prep, state, KVCache(pipe.specs["decoder"]))
    rng = np.random.default_rng(0)
    state.feeds = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in state.feeds.items()}
    assert np.array_equal(base, pipe.prefill(prep, state, KVCache(pipe.specs["decoder"])))
    state.has_image = True  # the same garbage K/V, attended: a different answer
    assert not np.allclose(base, pipe.prefill(prep, state, KVCache(pipe.specs["decoder"])))


def test_prompt_image_count_must_match(pipe, images):
    from mmexport.errors import UserError

    with pytest.raises(UserError, match="image"):
        pipe.prepare("<|image|><|image|>Two?", [images[0]], raw_prompt=True)


def test_run_cli_json(mllama_artifacts, images):
    p = run_cli("run", mllama_artifacts, "--image", images[1], "--prompt", "Describe.", "--max-new-tokens", "5", "--json")
    out = json.loads(p.stdout)
    assert out["generated_tokens"] == len(out["token_ids"]) >= 1
    assert out["calls"]["cross_kv"] == 1


def test_bench_shows_cross_kv_stage_and_calls(mllama_artifacts, images):
    p = run_cli("bench", mllama_artifacts, "--image", images[0], "--new-tokens", "6", "--repeat", "1", "--warmup", "0", "--json")
    r = json.loads(p.stdout)
    ours = r["ours"]
    assert "cross_kv" in ours["timings_ms"]
    assert ours["calls_per_request"] == {"vision_encoder": 1, "projector": 1, "cross_kv": 1, "embed_tokens": 6, "decoder": 6}


def test_tensorrt_rtx_builds_every_mllama_component(mllama_artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    import shutil

    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(mllama_artifacts, art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "cross_kv", "embed_tokens", "decoder"}
    for comp in meta["components"].values():
        assert (engine_dir / comp["engine"]).stat().st_size > 0
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]
    tiles = meta["components"]["decoder"]["input_shapes"]["decode"]["cross_attention_mask"]
    assert tiles["min"][2] == 1 and tiles["max"][2] == 2 * 4  # max_images x max_tiles


def test_real_recipe_builds_from_a_local_checkpoint(mllama_artifacts, images, tmp_path):
    """`--model DIR` takes the 11B recipe's path (fp16, one image) with any local mllama checkpoint."""
    src = json.loads((mllama_artifacts / "manifest.json").read_text())["source"]["path"]
    out = tmp_path / "llama11b-local"
    run_cli("build", "llama-3.2-11b-vision", "--model", src, "--out", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp16" and m["source"]["kind"] == "local" and m["limits"]["max_images"] == 1
    p = run_cli("run", out, "--image", images[0], "--prompt", "Describe.", "--max-new-tokens", "3", "--json")
    assert json.loads(p.stdout)["generated_tokens"] >= 1
    p = run_cli("run", out, "--image", images[0], "--image", images[1], "--prompt", "Two?", check=2)
    assert "at most 1" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_run_without_torch_or_transformers(mllama_artifacts, images, tmp_path):
    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    from conftest import REPO

    p = run_cli("run", mllama_artifacts, "--image", images[2], "--prompt", "Describe.", "--max-new-tokens", "3", "--json",
                env={"PYTHONPATH": f"{block}:{REPO}"})
    assert json.loads(p.stdout)["calls"]["cross_kv"] == 1


def test_fp16_build_verifies(cache_dir, tmp_path):
    """fp16 with fp32 islands on Method B: verify passes the tiny recipe's fp16 bounds (components, logits, greedy)."""
    out = tmp_path / "mllama-fp16"
    run_cli("build", "llama-3.2-vision-tiny", "--precision", "fp16", "--out", out)
    r = json.loads(run_cli("verify", out, "--json", timeout=900).stdout)
    assert r["passed"], r["failures"]
    assert r["precision"] == "fp16"
    worst = max(c["max_abs"] for c in r["comparisons"] if c["name"] != "preprocess")
    assert 0 < worst < 5e-2  # fp16 rounding is there, and bounded
