"""Aria end to end against transformers' AriaForConditionalGeneration, AriaProcessor and AriaImageProcessorPil:
crops, pixel masks and patch position rows, prompt expansion (<|img|> x crops x queries); the tiny recipe through
build, verify (fp32 and fp16), lint and the TensorRT-RTX builder; and a checkpoint of other dimensions (490-pixel
crops, split_image, another vision_feature_layer, 6 experts top-3) built without a recipe, whose greedy tokens
must equal transformers' `generate`. The MoE decoder's dense experts are tested on their own in
tests/test_moe_decoder.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from parity import parallel_builds

# Other dimensions than aria-tiny: 98-pixel patches (5x5 per 490 crop), split_image with 490-pixel crops, three ViT
# layers with features from the second-to-last, an untied 3-layer decoder with 6 experts (top-3) and 2 shared ones.
OTHER = {
    "seed": 3,
    "patch_to_query": {25: 6, 100: 12},
    "vision_feature_layer": -2,
    "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=490,
                          patch_size=98),
    "text_config": dict(hidden_size=80, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        moe_num_experts=6, moe_topk=3, moe_num_shared_experts=2, max_position_embeddings=1024,
                        tie_word_embeddings=False),
    "preprocessor": dict(max_image_size=490, min_image_size=98, split_image=True),
}


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def adapter():
    from mmexport.families import get_adapter

    return get_adapter("aria")


@pytest.fixture(scope="module")
def other(adapter, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("aria-other") / "my-aria"
    d.mkdir()
    for part in adapter.synthetic_parts(OTHER):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def builds(cache_dir, adapter, other, tmp_path_factory) -> dict[str, Path]:
    """The module's three builds side by side: aria-tiny at fp32 and fp16, and the other checkpoint without a recipe."""
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    resolve_source(load_recipe("aria-tiny"), None, adapter, log=lambda m: None)  # made once, before both builds read it
    root = tmp_path_factory.mktemp("aria-build")
    jobs = {
        "tiny": ("build", "aria-tiny"),
        "tiny-fp16": ("build", "aria-tiny", "--precision", "fp16"),
        "other": ("build", other, "--max-context", "512"),
    }
    return parallel_builds(jobs, root)


@pytest.fixture(scope="module")
def checkpoint(cache_dir, adapter) -> Path:
    from mmexport.checkpoints import resolve_source
    from mmexport.recipes import load_recipe

    d, _ = resolve_source(load_recipe("aria-tiny"), None, adapter, log=lambda m: None)
    return d


# -- host-side pieces against transformers --------------------------------------------------------------
@pytest.mark.parametrize("per_side", [5, 14, 70])
def test_patch_position_ids_equal_idefics3_embeddings(per_side):
    """Every real-patch count along each side (transformers buckets fractional coordinates in float32)."""
    import torch
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    from mmexport.families.aria.image import patch_position_ids

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=8, image_size=per_side * 2, patch_size=2))
    with torch.no_grad():  # the embedding's first channel is the position row, the patch term is zero
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.zero_()
        emb.position_embedding.weight[:, 0] = torch.arange(per_side * per_side, dtype=torch.float32)
    sides = range(1, per_side + 1) if per_side <= 14 else [1, 2, 3, 7, 13, 24, 35, 36, 49, 69, 70]
    masks = []
    for nh in sides:
        for nw in sides:
            m = np.zeros((per_side, per_side), dtype=bool)
            m[:nh, :nw] = True
            masks.append(m)
    masks = np.stack(masks)
    with torch.no_grad():
        ref = emb(torch.zeros(len(masks), 3, per_side * 2, per_side * 2), torch.from_numpy(masks))[..., 0].round().long()
    assert np.array_equal(patch_position_ids(masks, per_side), ref.numpy())


IMAGE_CONFIGS = {
    "980": dict(max_image_size=980),
    "490-min": dict(max_image_size=490, min_image_size=120),
    "980-split": dict(max_image_size=980, split_image=True),
    "490-split": dict(max_image_size=490, split_image=True),
}


@pytest.mark.parametrize("config", sorted(IMAGE_CONFIGS))
def test_preprocessing_equals_transformers_on_odd_sizes(config):
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    from mmexport.families.aria.image import AriaImageParams, preprocess_aria

    cfg = IMAGE_CONFIGS[config]
    ref = AriaImageProcessorPil(**cfg)
    params = AriaImageParams.from_preprocessor_config(ref.to_dict())
    kw = {"max_image_size": ref.max_image_size, "split_image": ref.split_image}
    sizes = [(37, 211, "RGB"), (123, 77, "L"), (301, 299, "RGBA"), (1003, 517, "RGB")]
    for i, (h, w, mode) in enumerate(sizes):
        img = _image(h, w, i, mode)
        ours = preprocess_aria(img, params)
        want = ref(images=[img], return_tensors="np", **kw)
        assert ours.num_crops == ref.get_number_of_image_patches(h, w, kw) == want["pixel_values"].shape[0], (h, w)
        assert np.abs(ours.pixel_values - want["pixel_values"]).max() <= 1e-5, (config, h, w)
        assert np.array_equal(ours.pixel_mask, want["pixel_mask"]), (config, h, w)


def test_prompt_expansion_equals_aria_processor(adapter, checkpoint, builds):
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    model = adapter.load(checkpoint)
    images = [_image(97, 211, 1), _image(333, 65, 2)]
    ref = adapter.reference_inputs(model, checkpoint, user_message("What differs?", 2), images)
    with _closing(Pipeline(builds["tiny"])) as pipe:
        prep = pipe.prepare("What differs?", images)
        assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
        assert int(np.count_nonzero(prep.input_ids == model.config.image_token_id)) == 2 * 8
        assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
        assert np.array_equal(np.concatenate([im.pixel_mask for im in prep.images]), ref["pixel_mask"].numpy())


class _closing:
    def __init__(self, p):
        self.p = p

    def __enter__(self):
        return self.p

    def __exit__(self, *exc):
        self.p.close()


def test_split_prompt_expansion_equals_aria_processor(adapter, other, builds):
    """split_image: each crop of each image gets its queries (images of equal crop counts: AriaProcessor counts every
    image with the largest crop count of the call, which only equals the model's features when they agree)."""
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.runtime.prompt import user_message

    model = adapter.load(other)
    images = [_image(131, 300, 4), _image(200, 480, 5)]
    ref = adapter.reference_inputs(model, other, user_message("Compare.", 2), images)
    assert ref["crops_per_image"] == [2, 2]
    with _closing(Pipeline(builds["other"])) as pipe:
        prep = pipe.prepare("Compare.", images)
        assert [im.num_crops for im in prep.images] == [2, 2]
        assert np.array_equal(prep.input_ids, ref["input_ids"][0].numpy())
        assert np.array_equal(np.concatenate([im.pixel_values for im in prep.images]), ref["pixel_values"].numpy())
        # unequal crop counts: each image keeps its own (AriaProcessor would give both the larger, which its model
        # cannot run; the reference says so in one line)
        mixed = [_image(131, 300, 4), _image(120, 1400, 6)]
        prep = pipe.prepare("Compare.", mixed)
        crops = [im.num_crops for im in prep.images]
        assert crops[0] != crops[1]
        assert int(np.count_nonzero(prep.input_ids == model.config.image_token_id)) == sum(crops) * 6
    from mmexport.errors import UserError

    with pytest.raises(UserError, match="largest count"):
        adapter.reference_inputs(model, other, user_message("Compare.", 2), mixed)


# -- the tiny recipe ------------------------------------------------------------------------------------
def _check_verify(rep: dict, bound: float) -> None:
    assert rep["passed"], rep["failures"]
    names = {(c["case"].split("[")[0], c["name"]) for c in rep["comparisons"]}
    for stage in ("preprocess", "vision_encoder", "projector", "decoder"):
        assert ("images", stage) in names, stage
    assert all(c["finite"] and c["max_abs"] <= bound for c in rep["comparisons"])
    checks = {(c["case"], c["name"]): c for c in rep["checks"]}
    for case in ("images", "text-only"):
        greedy = next(c for (k, n), c in checks.items() if k == case and n.startswith("greedy"))
        assert greedy["data"]["ours"] == greedy["data"]["transformers"] and greedy["data"]["ours"]


def test_verify_passes_fp32(builds):
    _check_verify(json.loads(run_cli("verify", builds["tiny"], "--json").stdout), 1e-4)


def test_verify_passes_fp16(builds):
    rep = json.loads(run_cli("verify", builds["tiny-fp16"], "--json").stdout)
    _check_verify(rep, 5e-2)
    assert max(c["max_abs"] for c in rep["comparisons"] if c["name"] == "vision_encoder") > 1e-5  # really fp16


def test_manifest_declares_crops_and_dense_experts(builds):
    m = json.loads((builds["tiny"] / "manifest.json").read_text())
    assert m["family"] == "aria" and m["model"]["text"]["experts"] == "dense"
    spec = {name: {t["name"]: t for t in c["spec"]["inputs"]} for name, c in m["components"].items()}
    assert spec["vision_encoder"]["pixel_values"]["shape"] == ["crops", 3, 980, 980]
    assert spec["projector"]["patch_mask"]["shape"] == ["crops", 196]
    assert spec["decoder"]["position_ids"]["shape"] == ["batch", "seq_len"]


def test_lint_clean_and_tensorrt_rtx_builds_every_component(builds, tmp_path):
    rep = json.loads(run_cli("lint", builds["tiny"], "--json").stdout)
    assert not [f for f in rep["findings"] if f["severity"] in ("error", "warning")], rep["findings"]
    pytest.importorskip("tensorrt_rtx_bindings")
    from mmexport.engines.commands import build_engines

    art = tmp_path / "art"
    shutil.copytree(builds["tiny"], art, ignore=shutil.ignore_patterns("engines"))
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lambda m: None)
    assert set(meta["components"]) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all((engine_dir / c["engine"]).stat().st_size > 0 for c in meta["components"].values())
    assert meta["components"]["decoder"]["profile_names"] == ["prefill", "decode"]


# -- another checkpoint, no recipe ----------------------------------------------------------------------
def test_other_checkpoint_build_without_recipe_gives_generate_tokens(adapter, other, builds, tmp_path):
    from mmexport.runtime.prompt import user_message

    out = builds["other"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "aria" and m["recipe"]["name"] == "my-aria"
    paths = []
    for i, (h, w) in enumerate(((131, 300), (200, 480))):  # two crops each
        paths.append(tmp_path / f"img{i}.png")
        _image(h, w, 10 + i).save(paths[-1])
    block = tmp_path / "block"  # the runtime runs with torch and transformers unimportable
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    env = {"PYTHONPATH": f"{block}:{REPO}"}
    torch_model = adapter.load(other)
    eos = set(torch_model.generation_config.eos_token_id)
    n = 12
    for prompt, imgs in (("Compare the two pictures.", paths), ("Write one sentence about rivers.", [])):
        args = [a for p in imgs for a in ("--image", p)]
        run = run_cli("run", out, *args, "--prompt", prompt, "--max-new-tokens", n, "--json", env=env)
        ours = json.loads(run.stdout)["token_ids"]
        ref_in = adapter.reference_inputs(torch_model, other, user_message(prompt, len(imgs)), [Image.open(p) for p in imgs])
        ref = adapter.reference_generate(torch_model, ref_in, n)
        assert ours and ours == ref[: len(ours)], (prompt, ours, ref)
        assert len(ours) == n or ref[len(ours)] in eos
