"""Model-family adapters, one file per family, registered by name.

An adapter knows one architecture: how to make a tiny synthetic checkpoint of it, how to load a
checkpoint, how to split the model into separately exported components (each a `ComponentSpec`
plus a torch module and example inputs), what the runtime needs to know (preprocessing, rotary
layout, special tokens), and how to produce PyTorch reference outputs for verify.

Generic code asks the registry for `get_adapter(recipe.family)`; it never branches on the family.
Importing this package imports no torch; adapters import it when they are used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .base import FamilyAdapter

# family name -> module that defines and registers its adapter
_FAMILY_MODULES = {
    "qwen2_vl": "mmexport.models.qwen2_vl",
    "mllama": "mmexport.models.mllama",
}
_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return deco


def families() -> list[str]:
    return sorted(_FAMILY_MODULES)


def get_adapter(name: str) -> "FamilyAdapter":
    if name not in _REGISTRY:
        if name not in _FAMILY_MODULES:
            raise UserError(f"unknown model family {name!r}; known: {', '.join(families())}")
        importlib.import_module(_FAMILY_MODULES[name])
    return _REGISTRY[name]()
