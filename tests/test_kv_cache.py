"""The runtime's static KV cache, on real builds of both families (ONNX Runtime):

- a request's first prefill gets zero-length views of the cache (the prompt attends only to itself), every
  later step views of the filled slots (ONNX Runtime) or the whole preallocated buffer (a backend with fixed
  shapes), always the same memory (never reallocated or copied), with the same logits either way;
- the zero-length prefill gives the same logits and keys/values as feeding the whole empty buffer;
- a prompt prefilled in two chunks (the second over the filled cache) gives the same first-token logits
  as one prefill: the cache path reads what the runtime wrote;
- the buffers follow the decoder's declaration, and builds made before `cache_len` (a fixed capacity) still run.
"""
from __future__ import annotations

import numpy as np
import pytest


def _pipe_and_prompt(request, which: str):
    from mmexport.runtime.pipeline import Pipeline

    art = request.getfixturevalue(which)
    images = request.getfixturevalue("images")
    pipe = Pipeline(art)
    prep = pipe.prepare("Describe the image.", [images[0]])
    return pipe, prep


def _record_feeds(pipe, monkeypatch) -> list[dict[str, np.ndarray]]:
    seen: list[dict[str, np.ndarray]] = []
    runner = pipe.runners["decoder"]
    orig = runner._infer

    def spy(feed):
        seen.append(dict(feed))
        return orig(feed)

    monkeypatch.setattr(runner, "_infer", spy)
    return seen


@pytest.mark.parametrize("which", ["tiny_artifacts", "mllama_artifacts"])
def test_first_prefill_gets_empty_views_then_the_same_buffer(request, which, monkeypatch):
    pipe, _ = _pipe_and_prompt(request, which)
    try:
        seen = _record_feeds(pipe, monkeypatch)
        res = pipe.generate("Describe the image.", [request.getfixturevalue("images")[0]], max_new_tokens=4, ignore_eos=True)
        assert len(res.token_ids) == 4 and len(seen) == 4  # prefill + 3 steps
        names = [n for n in seen[0] if n.startswith("cache_")]
        capacity = pipe.specs["decoder"].dims["cache_len"].max
        assert "cache_mask" in names and len(names) > 2
        assert all(seen[0][n].shape[-1 if n == "cache_mask" else 2] == 0 for n in names)
        buffers = {"cache_mask": seen[1]["cache_mask"].base, **{n: seen[1][n].base for n in names if n != "cache_mask"}}
        for k, step in enumerate(seen[1:]):  # ONNX Runtime gets views of the filled slots, growing by one per step
            filled = res.prompt_tokens + k
            assert all(step[n].shape[-1 if n == "cache_mask" else 2] == filled for n in names)
            for n in names:  # views of the very same buffers each step, the empty views too
                assert buffers[n].base is None and buffers[n].shape[-1 if n == "cache_mask" else 2] == capacity
                assert step[n].base is buffers[n] and seen[0][n].base is buffers[n]
            assert int(step["cache_mask"].sum()) == filled
        # the buffer itself now holds the prompt and the three decoded steps' keys/values
        assert int(buffers["cache_mask"].sum()) == res.prompt_tokens + 3
    finally:
        pipe.close()


@pytest.mark.parametrize("which", ["tiny_artifacts", "mllama_artifacts"])
def test_empty_view_prefill_equals_whole_empty_buffer(request, which):
    from mmexport.runtime.pipeline import KVCache

    pipe, prep = _pipe_and_prompt(request, which)
    try:
        state = pipe.encode_images(prep.images)
        embeds = pipe.family.prompt_embeds(pipe, prep, state)
        feeds = pipe.family.prefill_feeds(prep, state)
        cache = KVCache(pipe.specs["decoder"])
        views = pipe.runners["decoder"].infer({"inputs_embeds": embeds, **feeds, **cache.feeds()})
        whole = pipe.runners["decoder"].infer({"inputs_embeds": embeds, **feeds, "cache_mask": cache.mask, **cache.arrays})
        for name in views:
            np.testing.assert_allclose(views[name], whole[name], atol=1e-5, rtol=0, err_msg=name)
    finally:
        pipe.close()


@pytest.mark.parametrize("which", ["tiny_artifacts", "mllama_artifacts"])
def test_filled_slot_views_equal_the_whole_buffer(request, which):
    """Decode steps fed only the filled slots (ONNX Runtime) give the logits of the whole masked buffer."""
    from mmexport.runtime.pipeline import KVCache

    pipe, prep = _pipe_and_prompt(request, which)
    try:
        state = pipe.encode_images(prep.images)
        caches = [KVCache(pipe.specs["decoder"], whole=w) for w in (False, True)]
        logits = [pipe.prefill(prep, state, c) for c in caches]
        for _ in range(4):
            tok = int(np.argmax(logits[0]))
            assert tok == int(np.argmax(logits[1]))
            logits = [pipe.decoder_step(pipe.embed(np.asarray([tok])), pipe.family.step_feeds(prep, state, c.length), c) for c in caches]
            np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=0)
        assert caches[0].feeds()["cache_mask"].shape[1] == caches[0].length < caches[0].capacity
        assert caches[1].feeds()["cache_mask"].shape[1] == caches[1].capacity
        for n in caches[0].arrays:  # both wrote the same keys/values
            np.testing.assert_allclose(caches[0].arrays[n], caches[1].arrays[n], atol=1e-5, rtol=0)
    finally:
        pipe.close()


def test_prefill_in_two_chunks_matches_one(request):
    """Qwen2-VL: the prompt (with its image tokens) in one prefill, or split in two at a text position."""
    from mmexport.runtime.pipeline import KVCache

    pipe, prep = _pipe_and_prompt(request, "tiny_artifacts")
    try:
        state = pipe.encode_images(prep.images)
        embeds = pipe.family.prompt_embeds(pipe, prep, state)
        pos = pipe.family.prefill_feeds(prep, state)["position_ids"]
        whole = pipe.decoder_step(embeds, {"position_ids": pos}, KVCache(pipe.specs["decoder"]))
        cache = KVCache(pipe.specs["decoder"])
        cut = embeds.shape[1] - 5
        pipe.decoder_step(embeds[:, :cut], {"position_ids": np.ascontiguousarray(pos[..., :cut])}, cache)
        assert cache.length == cut
        split = pipe.decoder_step(np.ascontiguousarray(embeds[:, cut:]), {"position_ids": np.ascontiguousarray(pos[..., cut:])}, cache)
        assert cache.length == embeds.shape[1]
        assert np.abs(whole).max() > 0.1
        np.testing.assert_allclose(split, whole, atol=1e-4, rtol=0)
        assert int(np.argmax(split)) == int(np.argmax(whole))
    finally:
        pipe.close()


@pytest.mark.parametrize("declared", ["cache_len", 8])
def test_kv_cache_buffers_from_the_declaration(declared):
    """KVCache sizes its buffers from the decoder's declaration; a build made before the cache_len axis
    (capacity declared as a fixed size) still runs, fed the whole buffer from the first step."""
    from mmexport.runtime.pipeline import KVCache
    from mmexport.spec import ComponentSpec, Dim, TensorSpec

    dims = {"batch": Dim("batch", 1, 1, 1), "seq_len": Dim("seq_len", 1, 4, 8)}
    if declared == "cache_len":
        dims["cache_len"] = Dim("cache_len", 0, 8, 8)
    spec = ComponentSpec(
        "decoder",
        inputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq_len", 4)),
                TensorSpec("cache_mask", "int64", ("batch", declared)),
                *(TensorSpec(f"cache_{k}_0", "float32", ("batch", 2, declared, 3)) for k in ("key", "value"))),
        outputs=(TensorSpec("logits", "float32", ("batch", 1, 5)),
                 *(TensorSpec(f"{k}_0", "float32", ("batch", 2, "seq_len", 3)) for k in ("key", "value"))),
        dims=dims,
    )
    cache = KVCache(spec)
    assert cache.capacity == 8 and cache.arrays["cache_key_0"].shape == (1, 2, 8, 3)
    first = cache.feeds()
    assert first["cache_key_0"].shape[2] == (0 if declared == "cache_len" else 8)
    assert first["cache_mask"].shape == (1, 0 if declared == "cache_len" else 8)
    new = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    cache.append({"key_0": new, "value_0": -new})
    fed = cache.feeds()
    assert fed["cache_key_0"] is cache.arrays["cache_key_0"] and fed["cache_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(fed["cache_value_0"][:, :, :2], -new)
    assert not fed["cache_key_0"][:, :, 2:].any()
    with pytest.raises(Exception, match="holds 8 tokens"):
        cache.append({"key_0": np.zeros((1, 2, 7, 3), np.float32), "value_0": np.zeros((1, 2, 7, 3), np.float32)})


def test_stacked_grouped_query_attention_at_real_sizes():
    """scripts/bench_attention.py: mmexport's stacked GQA (self-attention over the static cache, Method B's
    cross-attention) against transformers' repeat_kv formulation at Qwen2-VL-2B / Llama 3.2 11B sizes,
    exported and run in ONNX Runtime: the same outputs, and the script stays runnable."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_attention.py"
    out = subprocess.run([sys.executable, str(script), "--repeat", "1"], capture_output=True, text=True, check=True).stdout
    diffs = [float(x) for x in re.findall(r"outputs differ by ([0-9.e+-]+)", out)]
    assert len(diffs) == 2 and all(d < 1e-5 for d in diffs), out
    assert "self-attention" in out and "cross-attention" in out
