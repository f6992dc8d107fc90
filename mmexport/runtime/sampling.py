"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded RNG.

The order of the filters follows transformers' logits processors (temperature, then top-k, then
top-p), so a seeded run is reproducible and the distribution is the one `generate` samples from.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# Below this, 1/temperature overflows the logits' float range or leaves a distribution that is
# greedy in all but name; such values are refused rather than turned into NaNs.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every value a request may carry is checked here (CLI and API alike): one UserError line."""
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or (t != 0 and t < MIN_TEMPERATURE):
            raise UserError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= p <= 1.0):  # NaN fails too
            raise UserError(f"top-p must be between 0 and 1, got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise UserError(f"top-k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**128):
            raise UserError(f"seed must be an integer from 0 to 2**128 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits [vocab] (any float dtype) -> token id."""
        if self.params.greedy:
            return int(np.argmax(logits))
        probs = _softmax(filter_logits(logits, self.params))
        return int(self.rng.choice(probs.size, p=probs))


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """float64 logits [vocab] after temperature, top-k and top-p, the removed tokens set to -inf
    (transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order).
    With temperature <= 0 (greedy) no temperature is applied."""
    p = params
    x = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay as they are
    if p.temperature > 0.0 and p.temperature != 1.0:
        x = x / p.temperature
    if p.top_k > 0 and p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x[x < kth] = -np.inf
    if p.top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        cum = np.cumsum(_softmax(x[order]))
        remove = cum <= (1.0 - p.top_p)
        remove[-1] = False  # always keep the most likely token
        x[order[remove]] = -np.inf
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()
