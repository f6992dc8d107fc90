"""mmexport.runtime.sampling against transformers' logits warpers (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, applied in generate's order) and against the distribution they define.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmexport.runtime.sampling import Sampler, SamplingParams, filter_logits  # noqa: E402


def _logits(seed: int, n: int = 200, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _hf_filtered(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """generate's warpers for do_sample=True, in generate's order; float64 so only the rule differs."""
    procs = LogitsProcessorList()
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1))
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    return procs(torch.zeros(1, 1, dtype=torch.long), scores)[0].numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    x = _logits(seed, 1000)
    assert Sampler(SamplingParams())(x) == int(np.argmax(x))
    # greedy ignores the RNG and the other knobs
    assert Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=seed))(x) == int(np.argmax(x))
    assert Sampler(SamplingParams())(x.astype(np.float16)) == int(np.argmax(x.astype(np.float16)))


def test_greedy_params():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy


# ---------------------------------------------------------------- seeding


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    x = _logits(0, 50, scale=1.0)  # flat enough that draws vary
    p = SamplingParams(temperature=1.0, seed=1234)
    s1, s2 = Sampler(p), Sampler(p)
    a = [s1(x) for _ in range(64)]
    b = [s2(x) for _ in range(64)]
    assert a == b
    assert len(set(a)) > 1  # it really samples
    s3 = Sampler(SamplingParams(temperature=1.0, seed=4321))
    c = [s3(x) for _ in range(64)]
    assert c != a


# ---------------------------------------------------------------- filters vs transformers

CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=10),
    SamplingParams(temperature=0.5, top_k=37),
    SamplingParams(temperature=1.0, top_k=500),  # larger than the vocab: no-op
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=0.01),  # keeps only the most likely token
    SamplingParams(temperature=1.0, top_p=0.0),  # the most likely token is always kept
    SamplingParams(temperature=1.3, top_p=0.95),
    SamplingParams(temperature=0.6, top_p=0.8),  # temperature before top-p changes the kept set
    SamplingParams(temperature=1.0, top_k=20, top_p=0.7),
    SamplingParams(temperature=2.0, top_k=50, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.99),
]


@pytest.mark.parametrize("params", CASES, ids=[f"t{p.temperature}-k{p.top_k}-p{p.top_p}" for p in CASES])
@pytest.mark.parametrize("seed", range(4))
def test_filtered_support_matches_transformers(params, seed):
    x = _logits(seed)
    ref = _hf_filtered(x, params)
    ours = filter_logits(x, params)
    assert ours.shape == x.shape
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-12, atol=0)


def test_top_p_support_really_depends_on_temperature():
    # guard for the comparison above: the kept set is not the same at every temperature
    x = _logits(3)
    a = np.isfinite(_hf_filtered(x, SamplingParams(temperature=0.6, top_p=0.8)))
    b = np.isfinite(_hf_filtered(x, SamplingParams(temperature=1.5, top_p=0.8)))
    assert a.sum() != b.sum()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_picks_outside_k_largest(k):
    x = _logits(11)
    allowed = set(np.argsort(x)[-k:].tolist())
    s = Sampler(SamplingParams(temperature=5.0, top_k=k, seed=0))  # hot: would roam without top-k
    picks = {s(x) for _ in range(400)}
    assert picks <= allowed
    if k > 1:
        assert len(picks) > 1


def test_top_p_never_picks_outside_nucleus():
    x = _logits(12)
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=0)
    allowed = set(np.flatnonzero(np.isfinite(_hf_filtered(x, params))).tolist())
    s = Sampler(params)
    picks = {s(x) for _ in range(400)}
    assert picks <= allowed and len(picks) > 1


def test_filter_does_not_modify_input():
    x = _logits(5)
    y = x.copy()
    filter_logits(x, SamplingParams(temperature=0.5, top_k=10, top_p=0.5))
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=0.7, top_k=6, seed=1),
        SamplingParams(temperature=1.2, top_p=0.8, seed=2),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.9, seed=3),
    ],
)
def test_empirical_frequencies_match_filtered_softmax(params):
    x = _logits(21, n=12, scale=1.0)
    probs = _softmax(_hf_filtered(x, params))
    n = 8000
    s = Sampler(params)
    counts = np.bincount([s(x) for _ in range(n)], minlength=x.size)
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = probs[support] * n
    chi2 = float((((counts[support] - expected) ** 2) / expected).sum())
    dof = int(support.sum()) - 1
    # a loose bound: mean dof, sd sqrt(2 dof); 6 sd is never hit by a correct sampler with these seeds
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, (chi2, dof)
