"""Checks shared by the fixed-size ViT families' tests (LLaVA, PaliGemma, Gemma 3, ...; families/towers.py): the tiny
recipe and a checkpoint of other dimensions built side by side, the vision tower's image count checked in ONNX
Runtime at several counts, verify reports, greedy tokens against transformers' generate with torch blocked, and
TensorRT-RTX + lint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from conftest import run_cli
from parity import blocked_env, parallel_builds


def odd_image(h: int, w: int, seed: int):
    """A deterministic RGB image with gradients and noise (so resampling differences would show)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


def save_images(root: Path, sizes: Sequence[tuple[int, int]], seed: int = 10) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (h, w) in enumerate(sizes):
        out.append(root / f"img{i}.png")
        odd_image(h, w, seed + i).save(out[-1])
    return out


def make_checkpoint(family: str, syn: dict[str, Any], root: Path) -> Path:
    from mmexport.families import get_adapter

    root.mkdir(parents=True)
    for part in get_adapter(family).synthetic_parts(syn):
        part.save_pretrained(root)
    return root


def build_all(recipe: str, other_ckpt: Path, root: Path, max_images: int | None = None) -> dict[str, Path]:
    """The tiny recipe at fp32 and fp16 and the other checkpoint without a recipe, built side by side."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    r = load_recipe(recipe)
    resolve_source(r, None, get_adapter(r.family), log=lambda m: None)  # made once, before the builds read it
    other = ("build", other_ckpt, "--max-context", "512") + (("--max-images", str(max_images)) if max_images else ())
    return parallel_builds({"tiny": ("build", recipe), "tiny-fp16": ("build", recipe, "--precision", "fp16"), "other": other}, root)


def check_preprocess(runtime_params, ref_processor, sizes: Sequence[tuple[int, int]], preprocess) -> None:
    """Our torch-free pixels against transformers' PIL processor on odd sizes (bit-identical in practice; <= 1e-5)."""
    for i, (h, w) in enumerate(sizes):
        img = odd_image(h, w, i)
        want = ref_processor(images=[img], return_tensors="np")["pixel_values"]
        got = preprocess(img, runtime_params)
        got = got[None] if got.ndim == 3 else got
        assert got.shape == want.shape, (h, w, got.shape, want.shape)
        assert np.abs(got - want).max() <= 1e-5, (h, w)


def check_vision_batch_counts(build: Path, adapter, model, counts: Sequence[int] = (1, 2, 3)) -> None:
    """The vision tower and the projector in ONNX Runtime with `n` pictures in one call (the image count is a real
    dynamic dim, not the traced 2) against transformers' tower + projector on the same pixels."""
    import torch

    from mmexport.runtime.pipeline import Pipeline

    pipe = Pipeline(build)
    try:
        spec = pipe.specs["vision_encoder"]
        _, c, h, w = spec.inputs[0].shape
        for n in counts:
            if n > spec.dims["num_images"].max:
                continue
            pv = np.random.default_rng(n).standard_normal((n, c, h, w)).astype(np.float32)
            vis = pipe.runners["vision_encoder"].infer({"pixel_values": pv})["vision_hidden"]
            emb = pipe.runners["projector"].infer({"vision_hidden": vis})["image_embeds"]
            with torch.no_grad():
                ref_vis, ref_emb = adapter.reference_features(model, torch.from_numpy(pv))
            assert vis.shape[0] == emb.shape[0] == n
            assert np.abs(vis - ref_vis.numpy()).max() < 1e-4, n
            assert np.abs(emb - ref_emb.numpy()).max() < 1e-4, n
    finally:
        pipe.close()


def check_verify(build: Path, bound: float, n_images: int) -> dict:
    rep = json.loads(run_cli("verify", build, "--json", check=None).stdout)
    assert rep["passed"], rep["failures"]
    names = {(c["case"], c["name"]) for c in rep["comparisons"]}
    for i in range(n_images):
        assert {(f"images[{i}]", s) for s in ("preprocess", "vision_encoder", "projector")} <= names
    assert {("images", "decoder"), ("text-only", "decoder")} <= names
    assert all(c["finite"] and c["max_abs"] <= bound for c in rep["comparisons"])
    for case in ("images", "text-only"):
        greedy = next(c for c in rep["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]
        ids = next(c for c in rep["checks"] if c["case"] == case and c["name"] == "prompt tokens")
        assert ids["passed"]
    return rep


def check_run_equals_generate(build: Path, ckpt: Path, adapter, model, cases, tmp_path: Path, n: int = 16) -> None:
    """`mmexport run --json` with torch and transformers unimportable against transformers' greedy generate through
    the family's processor path (the adapter's reference_inputs)."""
    from PIL import Image

    from mmexport.runtime.prompt import user_message

    env = blocked_env(tmp_path)
    eos = set(json.loads((build / "manifest.json").read_text())["tokenizer"]["eos_token_ids"])
    for prompt, images in cases:
        args = ["run", build, "--prompt", prompt, "--max-new-tokens", str(n), "--json"]
        for p in images:
            args += ["--image", p]
        ours = json.loads(run_cli(*args, env=env).stdout)
        ref_in = adapter.reference_inputs(model, ckpt, user_message(prompt, len(images)), [Image.open(p) for p in images])
        ref = adapter.reference_generate(model, ref_in, n)
        assert ours["prompt_tokens"] == ref_in["input_ids"].shape[1]
        k = len(ours["token_ids"])
        assert k > 0 and ours["token_ids"] == ref[:k] and (k == n or ref[k] in eos), (prompt, ours["token_ids"], ref)


def check_engines_and_lint(build: Path, tmp_path: Path) -> dict:
    lint = json.loads(run_cli("lint", build, "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] == "error"]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(build, art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all((engine_dir / c["engine"]).stat().st_size > 0 for c in meta["components"].values())
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]
    shapes = meta["components"]["vision_encoder"]["input_shapes"]
    pv = next(iter(shapes.values()))["pixel_values"]
    assert pv["min"][0] == 1 and pv["max"][0] >= 2  # the image count stays dynamic in the engine
    return meta
