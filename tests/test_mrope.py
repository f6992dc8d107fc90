"""mmexport.families.qwen2_vl.runtime's M-RoPE and vision rotary tables against transformers' Qwen2-VL (the real code).

- rope_index          vs Qwen2VLModel.get_rope_index (position ids [3, S] and mrope_position_deltas)
- step_positions      vs Qwen2VLModel.compute_3d_position_ids during decode (a real KV cache of the prompt), and vs
                        generate's own position bookkeeping (_prepare_position_ids_for_generation, then
                        _update_model_kwargs_for_generation per token), which also covers text-only prompts
- image_token_count   vs the rows the real vision tower emits per image
- vision_rotary_tables vs transformers.vision_utils.get_vision_position_ids + Qwen2VLVisionRotaryEmbedding
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from mmexport.errors import UserError  # noqa: E402
from mmexport.families.qwen2_vl.runtime import EncodedImage, Qwen2VLRuntime, rope_index, vision_rotary_tables  # noqa: E402

IMAGE = 290
VIDEO = 291
VSTART = 292
VEND = 293
MERGE = 2


@pytest.fixture(scope="module")
def gen_model() -> Qwen2VLForConditionalGeneration:
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            spatial_merge_size=MERGE,
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=300,
            bos_token_id=None,
            eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model(gen_model) -> Qwen2VLModel:
    return gen_model.model


def _image(t: int, h: int, w: int) -> list[int]:
    return [VSTART] + [IMAGE] * (t * h * w // MERGE**2) + [VEND]


def _text(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.integers(1, 280, size=n)]


def _hf_rope(model, ids: list[int], grids: list[tuple[int, int, int]]):
    x = torch.tensor([ids])
    mm = (x == IMAGE).int()
    pos, delta = model.get_rope_index(x, mm, image_grid_thw=torch.tensor(grids) if grids else None)
    return pos[:, 0].numpy(), int(delta.reshape(-1)[0])


def _layouts():
    """(name, grids, pieces): pieces are ('t', n) text runs and ('i', k) the k-th image."""
    g3 = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
    return [
        ("one image in the middle", [(1, 4, 6)], [("t", 5), ("i", 0), ("t", 7)]),
        ("one image at the start", [(1, 8, 4)], [("i", 0), ("t", 9)]),
        ("one image at the end", [(1, 2, 6)], [("t", 4), ("i", 0)]),
        ("tall image", [(1, 12, 2)], [("t", 3), ("i", 0), ("t", 3)]),
        ("three images, text between", g3, [("t", 6), ("i", 0), ("t", 3), ("i", 1), ("t", 11), ("i", 2), ("t", 2)]),
        ("three images, start/middle/end", g3, [("i", 0), ("t", 5), ("i", 1), ("t", 1), ("i", 2)]),
        ("three images back to back", g3, [("t", 2), ("i", 0), ("i", 1), ("i", 2), ("t", 4)]),
    ]


@pytest.mark.parametrize("name,grids,pieces", _layouts(), ids=[x[0] for x in _layouts()])
def test_rope_index_matches_transformers(model, name, grids, pieces):
    rng = np.random.default_rng(len(name))
    ids: list[int] = []
    for kind, v in pieces:
        ids += _text(rng, v) if kind == "t" else _image(*grids[v])
    ref_pos, ref_delta = _hf_rope(model, ids, grids)
    pos, delta = rope_index(ids, grids, IMAGE, MERGE)
    assert pos.shape == (3, len(ids))
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta
    # the runtime hook returns the same thing shaped [3, 1, S]
    rt = _runtime(model)
    rt_pos, rt_delta = rt.prompt_positions(ids, [_encoded(g) for g in grids])
    np.testing.assert_array_equal(rt_pos[:, 0], ref_pos)
    assert rt_delta == ref_delta


def test_rope_index_image_tokens_really_2d(model):
    # guard against a comparison that passes trivially: a non-square image must give rows != cols
    grids = [(1, 4, 8)]
    ids = [1, 2] + _image(*grids[0]) + [3]
    ref_pos, ref_delta = _hf_rope(model, ids, grids)
    img = np.array(ids) == IMAGE
    assert not np.array_equal(ref_pos[1, img], ref_pos[2, img])
    assert ref_delta != 0
    pos, delta = rope_index(ids, grids, IMAGE, MERGE)
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta


def test_rope_index_text_only(model):
    ids = _text(np.random.default_rng(1), 23)
    pos, delta = rope_index(ids, [], IMAGE, MERGE)
    # generate's text-only path: plain arange on all three rows, no delta
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
    assert delta == 0
    # and get_rope_index itself, fed an all-text sequence, agrees
    x = torch.tensor([ids])
    ref_pos, ref_delta = model.get_rope_index(x, torch.zeros_like(x, dtype=torch.int32))
    np.testing.assert_array_equal(pos, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta.reshape(-1)[0])


def _runtime(model) -> Qwen2VLRuntime:
    """The runtime hooks, configured from the tiny model the way the exporter's runtime_config does."""
    vc = model.config.vision_config
    return Qwen2VLRuntime(
        {
            "image": {
                "min_pixels": 3136,
                "max_pixels": 50176,
                "patch_size": vc.patch_size,
                "temporal_patch_size": vc.temporal_patch_size,
                "merge_size": vc.spatial_merge_size,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
            "vision": {
                "head_dim": vc.embed_dim // vc.num_heads,
                "rope_theta": vc.rope_parameters["rope_theta"],
                "spatial_merge_size": vc.spatial_merge_size,
            },
            "tokens": {"image_token_id": model.config.image_token_id},
        }
    )


def _encoded(grid) -> EncodedImage:
    t, h, w = grid
    return EncodedImage(np.zeros((t * h * w, 3 * 2 * 14 * 14), dtype=np.float32), grid)


def test_image_token_count_matches_vision_tower(model):
    """Tokens per image = rows of the real vision tower's merged output for that image."""
    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 6, 10)]
    rt = _runtime(model)
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    n = sum(t * h * w for t, h, w in grids)
    with torch.no_grad():
        feats = model.get_image_features(torch.randn(n, patch_dim), torch.tensor(grids)).pooler_output
    assert [rt.image_token_count(_encoded(g)) for g in grids] == [int(f.shape[0]) for f in feats]


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 4, 6), (1, 8, 4), (1, 2, 2)]])
def test_step_positions_match_transformers_decode(model, grids):
    """Prefill through the real language model, then ask compute_3d_position_ids for decode positions
    (its rope_deltas path: arange(past, past + n) + delta). Text-only prompts: see test_positions_match_generate."""
    rng = np.random.default_rng(7)
    ids = _text(rng, 3)
    for g in grids:
        ids += _image(*g) + _text(rng, 2)
    x = torch.tensor([ids])
    model.rope_deltas = None
    with torch.no_grad():
        emb = model.get_input_embeddings()(x)
        pre = model.compute_3d_position_ids(x, emb, image_grid_thw=torch.tensor(grids), mm_token_type_ids=(x == IMAGE).int())
        cache = model.language_model(inputs_embeds=emb, position_ids=pre, use_cache=True).past_key_values
    pos, delta = rope_index(ids, grids, IMAGE, MERGE)
    np.testing.assert_array_equal(pos, pre[:, 0].numpy())
    assert cache.get_seq_length() == len(ids)

    with torch.no_grad():
        for count in (1, 1, 3, 1):  # single decode steps and a multi-token chunk
            past = cache.get_seq_length()
            new = torch.tensor([_text(rng, count)])
            e = model.get_input_embeddings()(new)
            ref = model.compute_3d_position_ids(new, e, cache=cache)
            ours = Qwen2VLRuntime.step_positions(past, count, delta)
            assert ours.shape == (3, 1, count) and ours.dtype == np.int64
            np.testing.assert_array_equal(ours, ref.numpy())
            # the formula itself: arange(past, past + count) + delta on every row
            np.testing.assert_array_equal(ours, np.broadcast_to(np.arange(past, past + count) + delta, (3, 1, count)))
            model.language_model(inputs_embeds=e, position_ids=ref, cache=cache, use_cache=True)
    model.rope_deltas = None


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 4, 6), (1, 8, 4), (1, 2, 2)], []])
def test_positions_match_generate(gen_model, grids):
    """generate's own bookkeeping: _prepare_position_ids_for_generation for the prompt (text-only prompts get a
    plain arange and a zero delta), then _update_model_kwargs_for_generation once per new token."""
    rng = np.random.default_rng(3)
    ids = _text(rng, 4)
    for g in grids:
        ids += _image(*g) + _text(rng, 3)
    x = torch.tensor([ids])
    kw = {"attention_mask": torch.ones_like(x)}
    if grids:
        kw.update(mm_token_type_ids=(x == IMAGE).int(), image_grid_thw=torch.tensor(grids))
    gen_model.model.rope_deltas = None
    pos4 = gen_model._prepare_position_ids_for_generation(x, kw)  # [text; t; h; w]
    rt = _runtime(gen_model.model)
    pos, delta = rt.prompt_positions(ids, [_encoded(g) for g in grids])
    np.testing.assert_array_equal(pos, pos4[1:].numpy())
    assert delta == int(gen_model.model.rope_deltas.reshape(-1)[0])
    mk = {"position_ids": pos4}
    for k in range(5):
        mk = gen_model._update_model_kwargs_for_generation({}, mk, num_new_tokens=1)
        ref = mk["position_ids"][1:, :, -1:].numpy()
        np.testing.assert_array_equal(rt.step_positions(len(ids) + k, 1, delta), ref)
    gen_model.model.rope_deltas = None


@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("grid_hw", [(4, 6), (8, 4), (16, 16), (2, 10)])
def test_vision_rotary_tables_match_transformers(head_dim, grid_hw):
    h, w = grid_hw
    theta = 10000.0
    vc = Qwen2VLVisionConfig(
        embed_dim=head_dim * 16, num_heads=16, spatial_merge_size=MERGE, rope_parameters={"rope_type": "axial", "rope_theta": theta}
    )
    rotary = Qwen2VLVisionRotaryEmbedding(vc)
    pid = get_vision_position_ids(torch.tensor([[1, h, w]]), MERGE)
    ref_cos, ref_sin = rotary(torch.zeros(1), pid)
    cos, sin = vision_rotary_tables(h, w, MERGE, head_dim, theta)
    assert cos.shape == (h * w, head_dim) and sin.shape == (h * w, head_dim)
    assert cos.dtype == np.float32 and sin.dtype == np.float32
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)


def test_vision_rotary_tables_match_model_rotary(model):
    """The tiny model's own vision tower rotary (head_dim 32/2 = 16), through its config's theta."""
    vis = model.visual
    head_dim = vis.config.embed_dim // vis.config.num_heads
    theta = vis.config.rope_parameters["rope_theta"]
    for h, w in [(4, 6), (6, 4)]:
        pid = get_vision_position_ids(torch.tensor([[1, h, w]]), vis.spatial_merge_size)
        ref_cos, ref_sin = vis.rotary_pos_emb(torch.zeros(1), pid)
        cos, sin = vision_rotary_tables(h, w, vis.spatial_merge_size, head_dim, theta)
        np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)
        # and what the runtime feeds the exported vision encoder
        feeds = _runtime(model).vision_feeds(_encoded((1, h, w)))
        np.testing.assert_allclose(feeds["rotary_cos"], ref_cos.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(feeds["rotary_sin"], ref_sin.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "grids,ids",
    [
        ([(1, 4, 6), (1, 2, 2)], [1] + _image(1, 4, 6) + [2]),  # 2 images, 1 placeholder run
        ([(1, 4, 6)], [1] + _image(1, 4, 6) + [2] + _image(1, 2, 2)),  # 1 image, 2 placeholder runs
        ([(1, 4, 6)], [1, 2, 3]),  # 1 image, no placeholder
        ([], [1] + _image(1, 2, 2)),  # placeholders, no image
        ([(1, 4, 6)], [1] + _image(1, 2, 2) + [2]),  # too few tokens for the grid
        ([(1, 2, 2)], [1] + _image(1, 4, 6) + [2]),  # too many tokens for the grid
    ],
)
def test_rope_index_count_mismatch_raises(grids, ids):
    with pytest.raises(UserError):
        rope_index(ids, grids, IMAGE, MERGE)
