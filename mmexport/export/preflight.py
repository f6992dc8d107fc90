"""Checks on a checkpoint directory before anything slow happens (torch-free, reads headers only).

`check_checkpoint_files(model_dir)` runs before the model is loaded and exported, so a checkpoint
that cannot work is one line in a second, not a traceback after minutes of export:
- config.json (and the other JSON files the export reads) is a readable UTF-8 JSON object;
- the weights are there: *.safetensors (or the shards a model.safetensors.index.json names), each
  with a well-formed header (8-byte little-endian length, a JSON table of tensors whose dtypes,
  shapes and data offsets agree) and exactly as many data bytes as the header describes, which is
  what a truncated download or a half-copied file gets wrong;
- tokenizer.json is there and the `tokenizers` library loads it (the runtime needs it);
- preprocessor_config.json is there (image preprocessing is read from it).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable

from ..artifact.files import decode_utf8, open_checked
from ..errors import UserError

# safetensors dtypes -> bytes per element (sub-byte types count in bits below)
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def read_json(path: Path, what: str | None = None) -> Any:
    """A JSON file as data, or one UserError line saying what is wrong with it."""
    what = what or str(path)
    with open_checked(path, what) as f:
        text = decode_utf8(f.read(), what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def check_safetensors(path: Path) -> int:
    """Check a .safetensors file's header against its size; returns the number of tensors."""
    with open_checked(path, str(path)) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, not even a header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise UserError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    data_len = size - 8 - n
    end_max = 0
    count = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], t["shape"], t["data_offsets"]
            bits = _DTYPE_BITS[dtype]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors file (bad entry for tensor {name!r})") from None
        if not 0 <= begin <= end or end - begin != math.ceil(math.prod(shape) * bits / 8):
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r}: offsets {begin}..{end} do not fit {dtype} {shape})")
        end_max = max(end_max, end)
        count += 1
    if end_max != data_len:
        how = "truncated" if end_max > data_len else "corrupt"
        raise UserError(f"{path}: {how} safetensors file (the header describes {end_max} bytes of data, the file holds {data_len})")
    return count


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's .safetensors files (the shards its index names, when it has one)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index}: no weight_map")
        shards = []
        for name in sorted(set(wm.values())):
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise UserError(f"{index}: weight_map names {name!r}, not a file in the checkpoint directory")
            if not (model_dir / name).exists():
                raise UserError(f"{model_dir}: missing weights shard {name} (named in model.safetensors.index.json)")
            shards.append(model_dir / name)
        return shards
    return sorted(model_dir.glob("*.safetensors"))


def check_checkpoint_files(model_dir: Path, check_architecture: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Everything above; returns config.json. Raises UserError (one line) on the first problem.
    `check_architecture(model_dir)` (the family adapter's) runs once config.json is known to parse:
    a checkpoint of another architecture is told so before anything about its files."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory")
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    cfg = read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{model_dir / 'config.json'}: not a JSON object")
    if not isinstance(cfg.get("model_type"), str):
        raise UserError(f"{model_dir / 'config.json'}: no model_type")
    if check_architecture is not None:
        check_architecture(model_dir)
    weights = weight_files(model_dir)
    if not weights:
        other = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        hint = f" ({', '.join(other[:3])} found: convert them to safetensors)" if other else ""
        raise UserError(f"{model_dir}: no weights (*.safetensors){hint}")
    for w in weights:
        check_safetensors(w)
    if not (model_dir / "tokenizer.json").exists():
        raise UserError(f"{model_dir}: no tokenizer.json (the runtime needs the fast tokenizer file)")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.json"):
        if (model_dir / name).exists():
            read_json(model_dir / name)
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception with the parser's message
        raise UserError(f"{model_dir / 'tokenizer.json'}: the tokenizers library cannot load it ({str(e).splitlines()[0][:200]})") from None
    if not (model_dir / "preprocessor_config.json").exists():
        raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
    if not isinstance(read_json(model_dir / "preprocessor_config.json"), dict):
        raise UserError(f"{model_dir / 'preprocessor_config.json'}: not a JSON object")
    return cfg
