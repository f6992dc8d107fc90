"""Family-independent pieces of offline synthetic checkpoints: a byte-level BPE tokenizer trained on
the in-repo corpus, and the cache directory where synthetic checkpoints are materialized.

A synthetic checkpoint is an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer.json, chat template, preprocessor_config.json), so it goes through exactly the code path a
real local checkpoint takes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"

# Qwen2's pre-tokenizer split (the same regex as the released tokenizer.json of Qwen2 / Qwen2-VL).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Llama 3's pre-tokenizer split (tiktoken cl100k style: digits in groups of up to three).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int, split: str = QWEN2_SPLIT):
    """A byte-level BPE tokenizer (Qwen2-style pre-tokenization) trained on the in-repo corpus.

    Training is deterministic for a given corpus, vocab size and split regex. Special tokens get the ids right
    after the learned vocabulary, in the order given.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train([str(CORPUS)], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def cache_root() -> Path:
    return Path(os.environ.get("MMEXPORT_CACHE", Path.home() / ".cache" / "mmexport"))


def synthetic_dir(recipe_name: str, synthetic: dict[str, Any]) -> Path:
    """Where the synthetic checkpoint of `recipe_name` lives; the key hashes its whole definition."""
    blob = json.dumps(synthetic, sort_keys=True).encode() + CORPUS.read_bytes()
    key = hashlib.sha256(blob).hexdigest()[:12]
    return cache_root() / "synthetic" / f"{recipe_name}-{key}"
