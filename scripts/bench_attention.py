"""Decode-step attention at real model sizes: repeating K/V per query head (transformers' `repeat_kv`)
against mmexport's stacked grouped-query attention (`mmexport.families.attention`).

Both variants are exported with torch.onnx (dynamo) and timed in ONNX Runtime on the CPU with the
runtime's session settings (intra-op spinning off); their outputs are compared first.

    python scripts/bench_attention.py [--threads 2] [--repeat 30]

Cases (one decode step, one layer):
- self-attention over a static KV cache: Qwen2-VL-2B's decoder (Qwen2-1.5B: 12 heads / 2 KV heads,
  head_dim 128), a 4,096-slot cache with 1,500 tokens filled;
- cross-attention over the image K/V: Llama 3.2 11B Vision (32 heads / 8 KV heads, head_dim 128),
  4 tiles x 1,601 patches.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from mmexport.bench.limits import run_times
from mmexport.export.onnx_export import _quiet
from mmexport.families.attention import CacheContext, attend_over_cache, cross_attend as _cross_attend


def cache_biases(cache_mask, seq):
    return CacheContext(cache_mask, {}).biases(seq, None)


def attend_with_cache(q, k, v, cache_k, cache_v, cache_bias, new_bias, scaling, groups):
    o = attend_over_cache(q, k, v, cache_k, cache_v, cache_bias, new_bias, scaling)  # groups follow from the shapes
    return o.reshape(q.shape[0], q.shape[2], -1)


def cross_attend(q, ck, cv, bias, scaling, groups):
    return _cross_attend(q, ck, cv, bias, scaling)


def self_repeat(q, k, v, cache_k, cache_v, cache_bias, new_bias, scaling, groups):
    capacity = cache_k.shape[2]
    ck, cv = repeat_kv(cache_k, groups), repeat_kv(cache_v, groups)
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    s_cache = torch.matmul(q, ck.transpose(2, 3)).float() * scaling + cache_bias
    s_new = torch.matmul(q, kr.transpose(2, 3)).float() * scaling + new_bias
    w = torch.softmax(torch.cat([s_cache, s_new], dim=-1), dim=-1).to(q.dtype)
    o = torch.matmul(w[..., :capacity], cv) + torch.matmul(w[..., capacity:], vr)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def cross_repeat(q, ck, cv, bias, scaling, groups):
    ck, cv = repeat_kv(ck, groups), repeat_kv(cv, groups)
    w = torch.softmax(torch.matmul(q, ck.transpose(2, 3)).float() * scaling + bias, dim=-1).to(q.dtype)
    return torch.matmul(w, cv).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class SelfStep(torch.nn.Module):
    def __init__(self, fn, groups: int):
        super().__init__()
        self.fn, self.groups = fn, groups

    def forward(self, q, k, v, cache_k, cache_v, cache_mask):
        cache_bias, new_bias = cache_biases(cache_mask, q.shape[2])
        return self.fn(q, k, v, cache_k, cache_v, cache_bias, new_bias, 0.0884, self.groups)


class CrossStep(torch.nn.Module):
    def __init__(self, fn, groups: int):
        super().__init__()
        self.fn, self.groups = fn, groups

    def forward(self, q, ck, cv, bias):
        return self.fn(q, ck, cv, bias, 0.0884, self.groups)


def cases(g: torch.Generator):
    h, kv, d, cap = 12, 2, 128, 4096
    mask = torch.zeros(1, cap, dtype=torch.int64)
    mask[:, :1500] = 1
    yield ("self-attention, Qwen2-VL-2B decoder, 4,096-slot cache", SelfStep, h // kv,
           {"q": torch.randn(1, h, 1, d, generator=g), "k": torch.randn(1, kv, 1, d, generator=g),
            "v": torch.randn(1, kv, 1, d, generator=g), "cache_k": torch.randn(1, kv, cap, d, generator=g),
            "cache_v": torch.randn(1, kv, cap, d, generator=g), "cache_mask": mask},
           self_repeat, attend_with_cache)
    h, kv, d, n = 32, 8, 128, 4 * 1601
    yield ("cross-attention, Llama 3.2 11B Vision, 4 tiles x 1,601 patches", CrossStep, h // kv,
           {"q": torch.randn(1, h, 1, d, generator=g), "ck": torch.randn(1, kv, n, d, generator=g),
            "cv": torch.randn(1, kv, n, d, generator=g), "bias": torch.zeros(1, 1, 1, n)},
           cross_repeat, cross_attend)


def timed(path: Path, feed: dict[str, np.ndarray], threads: int, repeat: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return float(np.median(run_times(sess, feed, repeat))) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for title, wrapper, groups, inputs, old, new in cases(torch.Generator().manual_seed(0)):
            feed = {n: t.numpy() for n, t in inputs.items()}
            ref = wrapper(old, groups)(*inputs.values())
            ours = wrapper(new, groups)(*inputs.values())
            diff = float((ref - ours).abs().max())
            ms = {}
            for name, fn in (("repeat_kv", old), ("stacked", new)):
                path = Path(tmp) / f"{name}.onnx"
                with _quiet():
                    torch.onnx.export(wrapper(fn, groups), tuple(inputs.values()), str(path), input_names=list(inputs),
                                      dynamo=True, verbose=False)
                ms[name] = timed(path, feed, args.threads, args.repeat)
            print(f"{title}: repeat_kv {ms['repeat_kv']:.2f} ms, stacked {ms['stacked']:.2f} ms per layer and decode step "
                  f"({ms['repeat_kv'] / ms['stacked']:.1f}x; outputs differ by {diff:.1e}; ORT, {args.threads} threads, "
                  f"median of {args.repeat})")


if __name__ == "__main__":
    main()
