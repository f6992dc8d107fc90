"""Registry of the runtime side of each model family (torch-free), keyed by the manifest's family."""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError

_MODULES = {"qwen2_vl": "mmexport.runtime.qwen2_vl", "mllama": "mmexport.runtime.mllama"}
_REGISTRY: dict[str, type] = {}


def register_runtime(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def family_runtime(name: str, model_cfg: dict[str, Any]):
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise UserError(f"this mmexport has no runtime for model family {name!r}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name](model_cfg)
