"""Mistral 3 end to end against transformers' Mistral3ForConditionalGeneration: preprocessing against
PixtralImageProcessorPil, the rotary tables against PixtralVisionRotaryEmbedding, the prompt against the real
PixtralProcessor (golden data made by scripts/mistral3_processor_golden.py in a torchvision environment; rerun
live when MMEXPORT_TORCHVISION_VENV points at one), per-image vision + projector graphs at several grids against
transformers' batched get_image_features (the patch merger's split sizes), `verify` of the tiny recipe at fp32 and
fp16, a second checkpoint of other dimensions built with `mmexport build DIR` and run against `generate`, lint and
the TensorRT-RTX builder."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from parity import parallel_builds

GOLDEN = REPO / "tests" / "data" / "mistral3_processor.npz"

# Other dimensions than recipes/mistral3-tiny.toml: patch 14 (as Mistral Small 3.1), 2 ViT layers with features
# from the one before last (vision_feature_layer -2), GQA 3:1, head_dim * heads != hidden, a tied LM head, a
# sliding window shorter than the prompts, a projector with bias and another activation.
SECOND = {
    "seed": 5,
    "tokenizer_vocab_size": 900,
    "spatial_merge_size": 2,
    "vision_feature_layer": -2,
    "projector_hidden_act": "silu",
    "multimodal_projector_bias": True,
    "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, head_dim=16,
                          patch_size=14, image_size=224, hidden_act="gelu", rope_parameters=dict(rope_type="axial", rope_theta=5000.0)),
    "text_config": dict(hidden_size=80, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=64,
                        rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "preprocessor": dict(size={"longest_edge": 224}),
}

# mistralai/Mistral-Small-3.1-24B-Instruct-2503's preprocessor_config.json (the image keys) and its patch / merge
REAL_PREPROCESSOR = {"size": {"longest_edge": 1540}, "patch_size": {"height": 14, "width": 14},
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                     "rescale_factor": 0.00392156862745098, "resample": 3}


def _golden_module():
    spec = importlib.util.spec_from_file_location("mistral3_processor_golden", REPO / "scripts" / "mistral3_processor_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(cache_dir) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("mistral3-tiny"), None, get_adapter("mistral3"), log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    from mmexport.families import get_adapter

    d = tmp_path_factory.mktemp("checkpoints") / "my-mistral3"
    for part in get_adapter("mistral3").synthetic_parts(SECOND):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(checkpoint, second_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The module's three builds side by side: the tiny recipe at fp32 and fp16, and the second checkpoint with
    no recipe (`mmexport build DIR`: the family comes from config.json's model_type)."""
    root = tmp_path_factory.mktemp("build")
    jobs = {
        "tiny": ("build", "mistral3-tiny"),
        "tiny-fp16": ("build", "mistral3-tiny", "--precision", "fp16"),
        "second": ("build", second_checkpoint, "--max-context", "768"),
    }
    return parallel_builds(jobs, root)


@pytest.fixture(scope="module")
def model(checkpoint):
    from mmexport.families import get_adapter

    return get_adapter("mistral3").load(checkpoint)


@pytest.fixture(scope="module")
def pipe(builds):
    from mmexport.runtime.pipeline import Pipeline

    p = Pipeline(builds["tiny"])
    yield p
    p.close()


# -- host side against transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("config", ["real", "tiny"])
def test_preprocessing_equals_pixtral_pil_processor_on_odd_sizes(config, checkpoint):
    """PixtralImageProcessorPil as PixtralProcessor calls it (patch_size * spatial_merge_size), bit for bit."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from mmexport.families.mistral3.image import PixtralImageParams, preprocess_pixtral

    if config == "real":
        cfg, patch, merge = REAL_PREPROCESSOR, 14, 2
        ref = PixtralImageProcessorPil(**cfg)
        sizes = [(37, 211), (123, 77), (1700, 901), (2000, 3001), (5, 3)]
    else:
        cfg, patch, merge = json.loads((checkpoint / "preprocessor_config.json").read_text()), 8, 2
        ref = PixtralImageProcessorPil.from_pretrained(checkpoint)
        sizes = [(37, 211), (123, 77), (640, 33), (250, 410), (1, 1), (256, 256)]
    params = PixtralImageParams.from_preprocessor_config(cfg, patch, merge)
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, i)
        want = ref(images=[img], patch_size={"height": patch * merge, "width": patch * merge}, return_tensors="np")
        got = preprocess_pixtral(img, params)
        assert list(got.shape[1:]) == want["image_sizes"][0].tolist(), (h, w)
        assert np.array_equal(got, want["pixel_values"][0]), (h, w)
    rgba = _image(61, 93, 9).convert("RGBA")
    rgba.putalpha(128)
    want = ref(images=[rgba], patch_size={"height": patch * merge, "width": patch * merge}, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(preprocess_pixtral(rgba, params), want)


@pytest.mark.parametrize("grid,head_dim,theta", [((6, 10), 16, 10000.0), ((13, 3), 64, 10000.0), ((110, 110), 64, 10000.0), ((4, 8), 16, 5000.0)])
def test_rotary_tables_equal_pixtral_rotary(grid, head_dim, theta):
    import torch
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

    from mmexport.families.mistral3.runtime import rotary_tables

    h, w = grid
    cfg = PixtralVisionConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, image_size=4096,
                              rope_parameters={"rope_type": "axial", "rope_theta": theta})
    rope = PixtralVisionRotaryEmbedding(cfg)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.stack([hh.flatten(), ww.flatten()], -1))
    ours = rotary_tables(h, w, head_dim, theta)
    assert np.abs(ours[0].reshape(h * w, -1) - cos.numpy()).max() < 1e-5
    assert np.abs(ours[1].reshape(h * w, -1) - sin.numpy()).max() < 1e-5


def test_prompt_equals_pixtral_processor_golden(checkpoint, pipe):
    """The runtime's prompt (chat template, [IMG] rows with [IMG_BREAK], [IMG_END] last) and the reference path
    verify uses, against the real PixtralProcessor's input_ids, on odd sizes (one larger than longest_edge)."""
    from mmexport.families.mistral3.reference import processor_inputs
    from transformers import AutoTokenizer

    gold, mod = np.load(GOLDEN), _golden_module()
    images = mod.golden_images()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    for name, prompt, idx in mod.CASES:
        msgs = mod.messages(prompt, len(idx))
        prep = pipe.prepare_chat(msgs, [images[i] for i in idx])
        want = gold[f"{name}/input_ids"]
        assert np.array_equal(prep.input_ids, want), name
        assert tok.decode(prep.input_ids.tolist(), skip_special_tokens=False) == str(gold[f"{name}/text"])
        sizes = [list(im.pixels.shape[1:]) for im in prep.images]
        assert sizes == gold[f"{name}/image_sizes"].tolist()
        assert int((want == pipe.family.image_token_id).sum()) == sum(pipe.family.image_token_count(im) for im in prep.images)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert np.array_equal(processor_inputs(checkpoint, text, [images[i] for i in idx])["input_ids"][0].numpy(), want)
    assert "[IMG_BREAK]" in str(gold["two_images/text"]) and str(gold["one_image/text"]).count("[IMG_END]") == 1


@pytest.mark.skipif(not os.environ.get("MMEXPORT_TORCHVISION_VENV"), reason="set MMEXPORT_TORCHVISION_VENV to a venv with torchvision")
def test_golden_is_what_the_processor_makes_now(checkpoint, tmp_path):
    """Rerun the golden script with the real PixtralProcessor (torchvision environment): the same data."""
    py = Path(os.environ["MMEXPORT_TORCHVISION_VENV"]) / "bin" / "python"
    out = tmp_path / "now.npz"
    subprocess.run([str(py), str(REPO / "scripts" / "mistral3_processor_golden.py"), str(out)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    now, gold = np.load(out), np.load(GOLDEN)
    assert sorted(now) == sorted(gold)
    for k in gold:
        assert np.array_equal(now[k], gold[k]), k


def test_images_of_other_sizes_equal_transformers_batched_features(pipe, model):
    """One vision + projector call per image, at grids other than the traced one, against transformers'
    get_image_features on the padded batch of both images (its block mask and per-image split sizes)."""
    import torch

    images = [_image(150, 61, 1), _image(70, 230, 2), _image(256, 256, 3)]
    prep = pipe.prepare("Compare.", images)
    assert len({im.grid for im in prep.images}) == 3
    ours = pipe.encode_images(prep.images)
    pixels = [torch.from_numpy(im.pixels) for im in prep.images]
    H, W = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
    batch = torch.stack([torch.nn.functional.pad(p, (0, W - p.shape[2], 0, H - p.shape[1])) for p in pixels])
    sizes = torch.tensor([list(p.shape[1:]) for p in pixels])
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=batch, image_sizes=sizes).pooler_output
    for o, r in zip(ours, ref):
        assert o.shape == tuple(r.shape) and np.abs(o - r.numpy()).max() < 1e-4


# -- the tiny recipe ------------------------------------------------------------------------------------
def test_build_declares_per_image_grids(builds):
    m = json.loads((builds["tiny"] / "manifest.json").read_text())
    assert m["family"] == "mistral3"
    vis = m["components"]["vision_encoder"]["spec"]
    assert {t["name"]: t["shape"] for t in vis["inputs"]} == {"pixel_values": ["grid_h", "grid_w", 192],
                                                             "rotary_cos": ["grid_h", "grid_w", 16], "rotary_sin": ["grid_h", "grid_w", 16]}
    assert vis["dims"]["grid_h"] == vis["dims"]["grid_w"] == {"min": 2, "opt": 16, "max": 32, "multiple": 2}  # longest_edge 256 / 8
    assert m["components"]["decoder"]["spec"]["inputs"][1]["shape"] == ["batch", "seq_len"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_tiny_passes(precision, builds):
    r = json.loads(run_cli("verify", builds["tiny" if precision == "fp32" else "tiny-fp16"], "--json", check=None).stdout)
    assert r["passed"], r["failures"]
    assert r["precision"] == precision
    names = {(c["case"], c["name"]) for c in r["comparisons"]}
    for i in range(3):
        assert {(f"images[{i}]", s) for s in ("preprocess", "vision_encoder", "projector")} <= names
    assert all(c["finite"] for c in r["comparisons"])
    if precision == "fp32":
        assert all(c["max_abs"] <= 1e-4 for c in r["comparisons"])
    else:
        assert max(c["max_abs"] for c in r["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16
    for case in ("images", "text-only"):
        greedy = next(c for c in r["checks"] if c["case"] == case and c["name"].startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]
        assert next(c for c in r["checks"] if c["case"] == case and c["name"] == "prompt tokens")["passed"]


def test_tensorrt_rtx_builds_every_component_and_lint_is_clean(builds, tmp_path):
    lint = json.loads(run_cli("lint", builds["tiny"], "--json").stdout)
    assert not [f for f in lint["findings"] if f["severity"] == "error"]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(builds["tiny"], art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    for comp in meta["components"].values():
        assert (engine_dir / comp["engine"]).stat().st_size > 0
    shape = next(iter(meta["components"]["projector"]["input_shapes"].values()))["vision_hidden"]
    assert shape["min"][:2] == [2, 2] and shape["max"][:2] == [32, 32]


# -- another checkpoint, no recipe ----------------------------------------------------------------------
def test_second_checkpoint_run_equals_generate(builds, second_checkpoint, tmp_path):
    """`mmexport run --json` on the recipe-less build, torch and transformers unimportable: token ids identical to
    transformers' greedy generate (PixtralProcessor's path, the chat template), with two images and text-only."""
    from PIL import Image

    from mmexport.families import get_adapter
    from mmexport.runtime.prompt import user_message

    art = builds["second"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["family"] == "mistral3" and m["recipe"]["name"] == "my-mistral3"
    block = tmp_path / "block"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    paths = []
    for i, (h, w) in enumerate(((131, 47), (250, 199))):
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 20 + i).save(paths[-1])
    adapter = get_adapter("mistral3")
    model = adapter.load(second_checkpoint)
    eos = set(m["tokenizer"]["eos_token_ids"])
    n = 16
    for prompt, imgs in (("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])):
        args = [a for p in imgs for a in ("--image", p)]
        ours = json.loads(run_cli("run", art, *args, "--prompt", prompt, "--max-new-tokens", n, "--json",
                                  env={"PYTHONPATH": f"{block}:{REPO}"}).stdout)
        ref_in = adapter.reference_inputs(model, second_checkpoint, user_message(prompt, len(imgs)), [Image.open(p) for p in imgs])
        ref = adapter.reference_generate(model, ref_in, n)
        assert ours["prompt_tokens"] == ref_in["input_ids"].shape[1]
        assert ours["calls"]["vision_encoder"] == ours["calls"]["projector"] == len(imgs)
        k = len(ours["token_ids"])
        assert k > 0 and ours["token_ids"] == ref[:k] and (k == n or ref[k] in eos), (prompt, ours["token_ids"], ref)


def test_requests_decode_together_like_alone(pipe):
    """`serve`'s slots: an image request, a text-only one and a two-image one decoding in one batch give the
    tokens each gets alone (1D positions per row)."""
    from mmexport.runtime.batch import SlotDecoder
    from mmexport.runtime.pipeline import KVCache

    images = [_image(90, 140, 30), _image(200, 61, 31)]
    reqs = [("Describe.", images[:1]), ("Hello there.", []), ("Compare.", images)]
    n = 8

    def alone(prompt, imgs):
        prep = pipe.prepare(prompt, imgs)
        state, cache = pipe.encode_images(prep.images), KVCache(pipe.specs["decoder"])
        logits, toks = pipe.prefill(prep, state, cache), []
        for _ in range(n):
            toks.append(int(np.argmax(logits)))
            logits = pipe.decoder_step(pipe.embed(np.asarray([toks[-1]])), pipe.family.step_feeds(prep, state, cache.length), cache)
        return toks

    dec = SlotDecoder(pipe, 4)
    slots, logits, got = {}, {}, {i: [] for i in range(len(reqs))}
    for i, (prompt, imgs) in enumerate(reqs):
        prep = pipe.prepare(prompt, imgs)
        slots[i] = dec.free_slot()
        logits[i] = dec.admit(slots[i], prep, pipe.encode_images(prep.images))
    for _ in range(n):
        for i in slots:
            got[i].append(int(np.argmax(logits[i])))
        out = dec.step({slots[i]: got[i][-1] for i in slots})
        logits = {i: out[slots[i]] for i in slots}
    assert [got[i] for i in range(len(reqs))] == [alone(*r) for r in reqs]
