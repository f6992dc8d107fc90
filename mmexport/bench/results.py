"""What a bench run reports: per-stage statistics, memory, one side's figures, the whole report."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# every stage a family may time, in pipeline order; a side reports the ones it has (cross_kv: Method B)
STAGES = ("preprocess", "vision", "projector", "cross_kv", "prefill", "ttft", "decode", "total")


@dataclass
class Stats:
    """One measured quantity over the timed runs."""

    samples: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples)) if self.samples else 0.0

    @property
    def min(self) -> float:
        return float(min(self.samples)) if self.samples else 0.0

    @property
    def max(self) -> float:
        return float(max(self.samples)) if self.samples else 0.0

    def to_dict(self, nd: int = 3) -> dict[str, Any]:
        return {"median": round(self.median, nd), "min": round(self.min, nd), "max": round(self.max, nd),
                "samples": [round(s, nd) for s in self.samples]}


@dataclass
class Memory:
    """Resident set size (MB): before the model was loaded (its framework already imported), after
    loading, and the peak during the timed runs. Loading mmaps weights lazily in transformers, so
    `loaded_mb` can be far below the weights' size there; the peak is the comparable figure."""

    baseline_mb: float
    loaded_mb: float
    peak_mb: float
    method: str

    @property
    def peak_delta_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_mb": round(self.baseline_mb, 1), "loaded_mb": round(self.loaded_mb, 1),
                "peak_mb": round(self.peak_mb, 1), "peak_delta_mb": round(self.peak_delta_mb, 1), "method": self.method}


@dataclass
class SideResult:
    """The figures of one implementation (the exported model, or PyTorch eager)."""

    name: str
    timings_ms: dict[str, Stats]
    tokens_per_s: Stats
    tokens_generated: int
    prompt_tokens: int
    token_ids: list[int]
    memory: Memory
    load_s: float
    calls: dict[str, int] = field(default_factory=dict)  # component -> inferences per request
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "timings_ms": {k: v.to_dict() for k, v in self.timings_ms.items()},
            "decode_tokens_per_s": self.tokens_per_s.to_dict(),
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "token_ids": self.token_ids,
            "memory": self.memory.to_dict(),
            "load_s": round(self.load_s, 3),
            "calls_per_request": self.calls,
            "notes": self.notes,
        }


@dataclass
class BenchReport:
    artifacts: str
    backend: str
    precision: str
    recipe: str
    image: str
    image_size: list[int] | None
    prompt: str
    new_tokens: int
    repeat: int
    warmup: int
    machine: dict[str, Any]
    ours: SideResult
    eager: SideResult | None = None
    reference: dict[str, Any] | None = None  # checkpoint of the eager side
    limits: Any = None  # bench.limits.Limits: this machine's read bandwidth and GEMM peak, and how close the run came
    seconds: float = 0.0
    quantization: str = ""  # the build's weight formats beyond `precision` (describe_quantization), "" for none

    @property
    def ratios(self) -> dict[str, float] | None:
        """ours / eager per stage (below 1: ours is faster); decode_speedup = ours tok/s / eager tok/s."""
        if self.eager is None:
            return None
        r: dict[str, float] = {}
        for k in STAGES:
            if k not in self.ours.timings_ms or k not in self.eager.timings_ms:
                continue
            a, b = self.ours.timings_ms[k].median, self.eager.timings_ms[k].median
            if b > 0:
                r[f"{k}_ratio"] = a / b
        e = self.eager.tokens_per_s.median
        if e > 0:
            r["decode_speedup"] = self.ours.tokens_per_s.median / e
        if self.eager.memory.peak_delta_mb > 0:
            r["peak_delta_ratio"] = self.ours.memory.peak_delta_mb / self.eager.memory.peak_delta_mb
        return r

    @property
    def agreement(self) -> dict[str, Any] | None:
        """Do the greedy tokens of both sides agree?"""
        if self.eager is None:
            return None
        a, b = self.ours.token_ids, self.eager.token_ids
        prefix = 0
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
        n = max(len(a), len(b))
        return {
            "first_token": bool(a and b and a[0] == b[0]),
            "common_prefix": prefix,
            "fraction": (sum(1 for x, y in zip(a, b) if x == y) / n) if n else 1.0,
            "identical": a == b,
        }

    def to_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "artifacts": self.artifacts,
            "backend": self.backend,
            "precision": self.precision,
            "recipe": self.recipe,
            "image": self.image,
            "image_size": self.image_size,
            "prompt": self.prompt,
            "new_tokens": self.new_tokens,
            "repeat": self.repeat,
            "warmup": self.warmup,
            "machine": self.machine,
            "ours": self.ours.to_dict(),
            "eager": self.eager.to_dict() if self.eager else None,
            "ratios": {k: round(v, 4) for k, v in ratios.items()} if ratios is not None else None,
            "agreement": self.agreement,
            "reference": self.reference,
            "limits": self.limits.to_dict() if self.limits is not None else None,
            "seconds": round(self.seconds, 2),
            "quantization": self.quantization,
        }


def describe_quantization(quant: dict[str, Any] | None) -> str:
    """A build's quantization (its manifest's `quantization`) in a few words: "int4 blockwise, blocks of 32" and the
    vision tower's where it has its own; "" for an unquantized build."""
    if not quant:
        return ""

    def one(scheme, method, block):
        return f"{scheme} {method}" + (f", blocks of {block}" if method == "blockwise" and block else "")

    text = one(quant["scheme"], quant.get("method", ""), quant.get("block_size"))
    if quant.get("prefill_method"):
        text += f"; prefill int8 {quant['prefill_method']}"
    if quant.get("vision_scheme"):
        text += "; vision " + one(quant["vision_scheme"], quant.get("vision_method") or quant.get("method", ""), quant.get("block_size"))
    return text
