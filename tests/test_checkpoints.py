"""`mmexport build CHECKPOINT` (no recipe) for Qwen2-VL and Llama 3.2 Vision checkpoints of other dimensions
than the tiny recipes' (grouped-query ratios, an untied LM head, other layer layouts), and their answers:
`mmexport run --json` gives transformers' greedy tokens, with two images of odd sizes and text-only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from parity import run_vs_generate

pytest.importorskip("torch")

QWEN2_VL = {  # GQA 4:1 (8 heads / 2 KV), head_dim 16, an untied LM head, 3 layers; a 3-block ViT of width 48
    "seed": 5,
    "tokenizer_vocab_size": 1024,
    "init_std": 0.08,
    "vision_config": {"depth": 3, "embed_dim": 48, "num_heads": 4, "mlp_ratio": 2, "hidden_size": 128, "patch_size": 14,
                      "temporal_patch_size": 2, "spatial_merge_size": 2, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 8,
                    "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "preprocessor": {"min_pixels": 3136, "max_pixels": 40000},
}

MLLAMA = {  # cross-attention at 2 and 5 of 6 layers, GQA 3:1, tiles of 42 px
    "seed": 6,
    "tokenizer_vocab_size": 1024,
    "vision_config": {"hidden_size": 48, "attention_heads": 4, "num_hidden_layers": 3, "num_global_layers": 1, "intermediate_size": 96,
                      "image_size": 42, "patch_size": 14, "max_num_tiles": 4, "intermediate_layers_indices": [0, 2],
                      "vision_output_dim": 144, "norm_eps": 1e-5},
    "text_config": {"hidden_size": 72, "intermediate_size": 144, "num_hidden_layers": 6, "cross_attention_layers": [2, 5],
                    "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}},
}


def _checkpoint(family: str, synthetic: dict, out: Path) -> Path:
    from mmexport.families import get_adapter
    from mmexport.recipes import parse_recipe

    recipe = parse_recipe({"family": family, "source": {"synthetic": synthetic},
                           "limits": {"max_images": 2, "max_context": 256, "max_new_tokens": 32},
                           "tolerances": {"fp32": {"component_max_abs": 1e-4, "logits_max_abs": 1e-3}}}, "ckpt")
    get_adapter(family).make_synthetic(recipe, out)
    return out


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("odd-images")
    rng = np.random.default_rng(11)
    paths = []
    for i, (h, w) in enumerate(((97, 151), (213, 66))):
        p = d / f"odd{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("family,synthetic,extra,images_per_prompt", [
    ("qwen2_vl", QWEN2_VL, [], 4),
    ("mllama", MLLAMA, ["--max-images", "2"], 2),  # the family's default is one image per prompt
])
def test_build_checkpoint_answers_like_transformers(family, synthetic, extra, images_per_prompt, tmp_path, odd_images, cache_dir):
    ckpt = _checkpoint(family, synthetic, tmp_path / f"my-{family}-checkpoint")
    art = tmp_path / "art"
    run_cli("build", ckpt, "--out", art, "--max-context", "320", *extra, timeout=900)
    m = json.loads((art / "manifest.json").read_text())
    assert m["family"] == family and m["limits"]["max_context"] == 320 and m["limits"]["max_images"] == images_per_prompt
    assert m["recipe"]["name"] == ckpt.name and m["source"]["kind"] == "local"
    for images, prompt in ((odd_images, "Compare the two pictures."), ([], "Write a short poem about rain.")):
        r = run_vs_generate(art, ckpt, family, prompt, images, tokens=12)
        assert r["ours"] == r["transformers"] and r["ours"], (family, len(images), r)


def test_checkpoint_default_output_dir_and_context(tmp_path, cache_dir):
    """Without --out the build goes to artifacts/<directory name>; the context is the config's, capped at 4096."""
    ckpt = _checkpoint("qwen2_vl", {**QWEN2_VL, "text_config": {**QWEN2_VL["text_config"], "max_position_embeddings": 8192}},
                       tmp_path / "ctx-ckpt")
    from mmexport.checkpoints import checkpoint_build_recipe

    r = checkpoint_build_recipe(str(ckpt))
    assert r.name == "ctx-ckpt" and r.family == "qwen2_vl" and r.limits.max_context == 4096 and r.limits.max_images == 4
    assert checkpoint_build_recipe(str(ckpt), max_context=1000).limits.max_context == 1000
    p = run_cli("build", ckpt, "--max-context", "9000", check=2)
    assert "max_position_embeddings" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_unknown_architecture_is_one_line(tmp_path, cache_dir):
    d = tmp_path / "not-a-vlm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    p = run_cli("build", d, check=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_type 'bert' is not supported" in lines[0]
    assert "Qwen2-VL (qwen2_vl)" in lines[0] and "Llama 3.2 Vision (mllama)" in lines[0]
