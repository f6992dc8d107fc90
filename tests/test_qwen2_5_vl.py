"""Qwen2.5-VL end to end against transformers' Qwen2_5_VLForConditionalGeneration: the window layout against
`get_vision_window_index`, preprocessing / prompt expansion / M-RoPE positions against transformers' processor
path, `verify` of the tiny recipe at fp32 and fp16, a second checkpoint of other dimensions built with
`mmexport build CHECKPOINT_DIR` and run against `generate`, and the TensorRT-RTX builder."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from parity import parallel_builds

# Other dimensions than recipes/qwen2.5-vl-tiny.toml: GQA 3:1 (tiny 2:1), an untied LM head, 5 ViT blocks with
# full attention in 0 and 3 (tiny: 3 blocks, 1), 3x3-unit windows (tiny 2x2), 3 decoder layers, other widths.
SECOND = {
    "seed": 3,
    "tokenizer_vocab_size": 900,
    "vision_config": dict(depth=5, hidden_size=48, intermediate_size=80, num_heads=3, out_hidden_size=120, patch_size=14,
                          temporal_patch_size=2, spatial_merge_size=2, window_size=84, fullatt_block_indexes=[0, 3], hidden_act="silu"),
    "text_config": dict(hidden_size=120, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 4, 4])),
    "preprocessor": dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 100),
}
# (height, width): 7x5 merge units = 3x2 windows of 3x3 with partial ones; 3x9 = three whole windows; 4x3
ODD_SIZES = ((201, 130), (90, 250), (123, 77))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("q25-images")
    rng = np.random.default_rng(11)
    out = []
    for i, (h, w) in enumerate(ODD_SIZES):
        p = d / f"odd{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    """A synthetic Qwen2.5-VL checkpoint of other dimensions, saved as a plain Hugging Face directory."""
    from mmexport.families import get_adapter

    d = tmp_path_factory.mktemp("checkpoints") / "qwen25-second"
    for part in get_adapter("qwen2_5_vl").synthetic_parts(SECOND):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(cache_dir, second_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The module's three builds, run side by side: the tiny recipe at fp32 and at fp16, and the second checkpoint
    with no recipe (`mmexport build DIR`: the family comes from config.json)."""
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    recipe = load_recipe("qwen2.5-vl-tiny")
    resolve_source(recipe, None, get_adapter(recipe.family), log=lambda m: None)  # made once, before both builds read it
    root = tmp_path_factory.mktemp("build")
    jobs = {
        "tiny": ("build", "qwen2.5-vl-tiny"),
        "tiny-fp16": ("build", "qwen2.5-vl-tiny", "--precision", "fp16"),
        "second": ("build", second_checkpoint),
    }
    return parallel_builds(jobs, root)


@pytest.fixture(scope="module")
def tiny(builds) -> Path:
    return builds["tiny"]


@pytest.fixture(scope="module")
def second_build(builds) -> Path:
    return builds["second"]


@pytest.fixture(scope="module")
def second_model(second_checkpoint):
    from mmexport.families import get_adapter

    adapter = get_adapter("qwen2_5_vl")
    return adapter, adapter.load(second_checkpoint)


def test_chat_template_is_qwen25_vl_published_one():
    """Qwen2.5-VL-*-Instruct's chat_template.json (digest of its JSON string as published for Qwen2.5-VL-7B-Instruct)."""
    from mmexport.families.qwen2_5_vl.export import Qwen25VLAdapter

    digest = hashlib.sha256(json.dumps(Qwen25VLAdapter.chat_template).encode()).hexdigest()
    assert digest == "4df95d05455c2a6f762616492bba63d0f9bef904ef47daabad35f5715d6d2e4e"


@pytest.mark.parametrize("merge,patch,window_size", [(2, 14, 112), (2, 14, 56), (2, 14, 84), (2, 16, 128), (1, 14, 56)])
def test_window_layout_equals_transformers(merge, patch, window_size):
    """window order and cu_window_seqlens of transformers' get_vision_window_index on odd grids: several windows,
    partial ones, grids of whole windows; the index tables map every patch to exactly one slot and back."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    from mmexport.families.qwen2_5_vl.runtime import window_layout, window_order

    win = window_size // merge // patch
    slots = win * win * merge * merge
    grids = [(h, w) for h in range(merge, 26 * merge, merge) for w in range(merge, 26 * merge, 3 * merge)]
    for h, w in grids:
        index, cu = get_vision_window_index(torch.tensor([[1, h, w]]), merge, window_size, patch)
        units, our_cu = window_order(h, w, merge, win)
        assert np.array_equal(units, index.numpy()) and np.array_equal(our_cu, cu.numpy()), (h, w)
        lay = window_layout(h, w, merge, win)
        n = h * w
        assert lay.window_index.shape == (len(cu) - 1, slots)
        flat = lay.window_index.reshape(-1)
        assert np.array_equal(flat[lay.patch_slots], np.arange(n))  # each row sits in its slot
        assert sorted(flat[flat >= 0]) == list(range(n))  # every row once, the rest padding
        # each window's slots hold exactly transformers' window segment
        for wdx in range(len(cu) - 1):
            rows = lay.window_index[wdx][lay.window_index[wdx] >= 0]
            assert np.array_equal(rows, np.arange(cu[wdx], cu[wdx + 1]))
        # patch rows follow the unit order; the tokens go back to raster order
        assert np.array_equal(lay.patch_order.reshape(-1, merge * merge)[:, 0] // (merge * merge), index.numpy())
        assert np.array_equal(index.numpy()[lay.token_order], np.arange(len(index)))


def test_window_count_bound_holds_for_any_image():
    """The declared num_windows range covers every grid the processor produces within the declared num_patches
    range, extreme aspect ratios included (long thin grids take the most windows)."""
    from mmexport.families.qwen2_5_vl.export import max_windows
    from mmexport.families.qwen2_5_vl.runtime import count_windows
    from mmexport.families.qwen2_vl.image import smart_resize

    rng = np.random.default_rng(0)
    for min_px, max_px, win in ((3136, 50176, 2), (3136, 78400, 3), (3136, 12845056, 4)):
        units = max_px // 28**2  # the num_patches bound, in merge units
        bound = max_windows(units, win)
        sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(300, 2))]
        sizes += [(s, s * r) for s in (1, 5, 14, 27, 29, 41, 55, 150, 1000) for r in (1, 2, 37, 101, 199, 200)]
        worst, seen = 0, 0
        for h, w in sizes + [(w, h) for h, w in sizes]:
            if max(h, w) / min(h, w) > 200:
                continue  # the processor refuses these
            gh, gw = smart_resize(h, w, 28, min_px, max_px)
            if (gh // 28) * (gw // 28) <= units:
                worst = max(worst, count_windows(gh // 14, gw // 14, 2, win))
                seen += 1
        assert seen > 500 and 1 < worst <= bound


def test_preprocessing_prompt_and_positions_equal_transformers(second_build, second_checkpoint, second_model, odd_images):
    """The torch-free runtime against transformers on odd sizes: the image processor transformers picks for
    qwen2_5_vl (pixels, grids), the expanded and tokenized chat prompt, and get_rope_index's M-RoPE positions."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    adapter, model = second_model
    pil = [Image.open(p) for p in odd_images]
    pipe = Pipeline(second_build)
    try:
        prep = pipe.prepare("Describe the pictures.", pil)
    finally:
        pipe.close()
    ip = AutoImageProcessor.from_pretrained(second_checkpoint)
    auto = ip(images=pil, return_tensors="np")
    assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), auto["pixel_values"])
    assert [list(im.grid_thw) for im in prep.images] == auto["image_grid_thw"].tolist()

    ref = adapter.reference_inputs(model, second_checkpoint, user_message("Describe the pictures.", len(pil)), pil)
    assert torch.equal(ref["image_grid_thw"], torch.from_numpy(auto["image_grid_thw"]))  # the reference's processor is that one
    assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
    pos, delta = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], image_grid_thw=ref["image_grid_thw"])
    assert np.array_equal(prep.position_ids, pos.numpy()) and prep.rope_delta == int(delta)
    # and the images really span several windows, partial and whole
    counts = [pipe.family.layout(im).window_index.shape[0] for im in prep.images]
    pads = [pipe.family.layout(im).padding for im in prep.images]
    assert counts == [6, 3, 2] and pads[1] == 0 and pads[0] > 0 and pads[2] > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    """Every component on transformers' own inputs, the whole chain, and greedy tokens; fp16 on its own build."""
    r = json.loads(run_cli("verify", builds["tiny" if precision == "fp32" else "tiny-fp16"], "--json", check=None).stdout)
    assert r["passed"], r["failures"]
    assert r["precision"] == precision
    names = {(c["case"], c["name"]) for c in r["comparisons"]}
    for i in range(3):  # verify's three odd images, each spanning several windows
        assert {(f"images[{i}]", s) for s in ("preprocess", "vision_encoder", "projector")} <= names
    for case in ("images", "text-only"):
        greedy = next(c for c in r["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]
    assert next(c for c in r["checks"] if c["name"] == "position ids")["passed"]


def test_second_checkpoint_run_equals_generate(second_build, second_checkpoint, second_model, odd_images, tmp_path):
    """`mmexport run --json` on the recipe-less build of another checkpoint, with torch and transformers
    unimportable: token ids identical to transformers' greedy generate through the processor path and chat
    template, with two images and text-only."""
    from PIL import Image

    from mmexport.runtime.prompt import user_message

    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    adapter, model = second_model
    m = json.loads((second_build / "manifest.json").read_text())
    assert m["family"] == "qwen2_5_vl" and m["source"] == {**m["source"], "kind": "local", "path": str(second_checkpoint)}
    eos = set(m["tokenizer"]["eos_token_ids"])
    for images, prompt in ((odd_images[:2], "Compare the two pictures."), ([], "Write one sentence about the sea.")):
        args = ["run", second_build, "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        for p in images:
            args += ["--image", p]
        ours = json.loads(run_cli(*args, env={"PYTHONPATH": f"{block}:{REPO}"}).stdout)
        pil = [Image.open(p) for p in images]
        ref_in = adapter.reference_inputs(model, second_checkpoint, user_message(prompt, len(pil)), pil)
        ref = adapter.reference_generate(model, ref_in, 20)
        assert ours["prompt_tokens"] == ref_in["input_ids"].shape[1]
        assert ours["calls"]["vision_encoder"] == ours["calls"]["projector"] == len(images)
        n = len(ours["token_ids"])
        assert n > 0 and ours["token_ids"] == ref[:n] and (n == 20 or ref[n] in eos)  # transformers keeps the EOS


def test_tensorrt_rtx_builds_every_component_and_lint_is_clean(tiny, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(tiny, art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    for comp in meta["components"].values():
        assert (engine_dir / comp["engine"]).stat().st_size > 0
    shapes = meta["components"]["vision_encoder"]["input_shapes"]
    windows = next(iter(shapes.values()))["window_index"]
    assert windows["min"][0] == 1 and windows["max"][0] > windows["min"][0]
    lint = json.loads(run_cli("lint", tiny, "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] == "error"]
