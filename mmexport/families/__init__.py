"""Model families: one package each (mmexport/families/NAME/), registered once, in FAMILIES below.

Each package's `__init__.py` defines `FAMILY`, a torch-free `Family` descriptor: the config.json
`model_type`s it accepts, its method (A: image embeddings merged into the decoder's input; B:
cross-attention layers), and where its export adapter (`export.py`, imports torch when used) and its
torch-free runtime (`runtime.py`) live, as "module:Class". The export side asks `get_adapter(name)`, the
runtime `get_runtime(name, model_cfg)`, `mmexport build CHECKPOINT` asks `family_for_model_type`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from .base import FamilyAdapter

# family name -> the package that defines FAMILY
FAMILIES: dict[str, str] = {
    "qwen2_vl": "mmexport.families.qwen2_vl",
    "qwen2_5_vl": "mmexport.families.qwen2_5_vl",
    "qwen3_vl": "mmexport.families.qwen3_vl",
    "mllama": "mmexport.families.mllama",
    "llava": "mmexport.families.llava",
    "paligemma": "mmexport.families.paligemma",
    "llava_onevision": "mmexport.families.llava_onevision",
    "janus": "mmexport.families.janus",
    "molmo2": "mmexport.families.molmo2",
    "aria": "mmexport.families.aria",
    "mistral3": "mmexport.families.mistral3",
    "gemma3": "mmexport.families.gemma3",
    "idefics3": "mmexport.families.idefics3",
    "smolvlm": "mmexport.families.smolvlm",
    "internvl": "mmexport.families.internvl",
    "fuyu": "mmexport.families.fuyu",
    "emu3": "mmexport.families.emu3",
}


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # for people: "Qwen2-VL"
    method: str  # "A" (embedding merge) or "B" (cross-attention)
    model_types: tuple[str, ...]
    adapter: str  # "module:Class", export side
    runtime: str  # "module:Class", torch-free


def _load(ref: str):
    module, cls = ref.split(":")
    return getattr(importlib.import_module(module), cls)


def families() -> list[str]:
    return sorted(FAMILIES)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(families())}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def all_families() -> list[Family]:
    return [family(n) for n in families()]


def family_for_model_type(model_type: Any, where: str = "checkpoint") -> Family:
    """The family whose checkpoints have this config.json `model_type`."""
    for f in all_families():
        if model_type in f.model_types:
            return f
    supported = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in all_families())
    raise UserError(f"{where}: model_type {model_type!r} is not supported; mmexport exports {supported}")


def get_adapter(name: str) -> "FamilyAdapter":
    f = family(name)
    adapter = _load(f.adapter)()
    adapter.family, adapter.model_types = f.name, f.model_types
    return adapter


def get_runtime(name: str, model_cfg: dict[str, Any]):
    """The torch-free runtime of a family (a runtime.methods strategy) for a manifest's "model" table."""
    if name not in FAMILIES:
        raise UserError(f"this mmexport has no runtime for model family {name!r}")
    return _load(family(name).runtime)(model_cfg)
