"""Which TensorRT flavour builds the engines.

Two flavours share one Python API (Builder, OnnxParser, IBuilderConfig, Runtime):

- 'tensorrt': NVIDIA TensorRT (`import tensorrt`), on Jetson (JetPack 6: TensorRT 10.3) and GPU servers.
  It needs a GPU to build, and an engine runs only on GPUs of the compute capability it was built on.
- 'tensorrt-rtx': TensorRT for RTX (pip `tensorrt-rtx-cu13-libs` + `tensorrt-rtx-cu13-bindings`, module
  `tensorrt_rtx_bindings`; older wheels and the SDK tarball's wheel are named `tensorrt_rtx`). Its builder
  works ahead-of-time on a CPU-only machine; by default the engine is portable across Ampere and later
  GPUs and is specialised just-in-time on the target.

Nothing here imports either library until `resolve_flavor` is called.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from mmexport.errors import UserError

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
FLAVORS = (TENSORRT, TENSORRT_RTX)

# Module names to try, in order, for each flavour.
_MODULES: dict[str, tuple[str, ...]] = {
    TENSORRT: ("tensorrt",),
    TENSORRT_RTX: ("tensorrt_rtx_bindings", "tensorrt_rtx"),
}

INSTALL_HINTS: dict[str, str] = {
    TENSORRT: (
        "install NVIDIA TensorRT: on Jetson it comes with JetPack (apt install python3-libnvinfer, "
        "or use a venv created with --system-site-packages); on a GPU server `pip install tensorrt`"
    ),
    TENSORRT_RTX: (
        "install TensorRT for RTX: `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings` "
        "(or `pip install 'mmexport[tensorrt-rtx]'`); it builds engines without a GPU"
    ),
}


@dataclass(frozen=True)
class Flavor:
    """A resolved TensorRT flavour: its module and version."""

    name: str  # 'tensorrt' or 'tensorrt-rtx'
    module: Any = None
    version: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.name == TENSORRT_RTX

    @property
    def supports_timing_cache(self) -> bool:
        # TensorRT-RTX deprecated its timing cache in 1.2: the calls are accepted and do nothing.
        return self.name == TENSORRT

    @property
    def needs_gpu_to_build(self) -> bool:
        return self.name == TENSORRT


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_flavors() -> list[str]:
    """Flavours whose Python module is installed (found, not imported: importing loads large libraries)."""
    return [f for f in FLAVORS if any(_module_present(m) for m in _MODULES[f])]


def _import_flavor(name: str) -> Flavor:
    errors: list[str] = []
    for mod_name in _MODULES[name]:
        if not _module_present(mod_name):
            continue
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # a present but broken install (missing libs, CUDA mismatch, ...)
            errors.append(f"`import {mod_name}` failed: {type(e).__name__}: {e}")
            continue
        version = str(getattr(mod, "__version__", "") or "unknown")
        return Flavor(name=name, module=mod, version=version)
    why = "; ".join(errors) if errors else "not installed"
    raise UserError(f"{name} is not available ({why}); {INSTALL_HINTS[name]}")


def resolve_flavor(flavor: "str | Flavor | None" = "auto") -> Flavor:
    """Return the flavour to build with.

    "auto" (or None) prefers NVIDIA TensorRT when it is installed, else TensorRT-RTX. A named flavour that
    is missing raises UserError with an install hint. A `Flavor` passes through unchanged.
    """
    if isinstance(flavor, Flavor):
        return flavor
    name = (flavor or "auto").strip().lower().replace("_", "-")
    if name in ("trt", "nvidia"):
        name = TENSORRT
    if name in ("rtx", "trt-rtx"):
        name = TENSORRT_RTX
    if name == "auto":
        present = available_flavors()
        if not present:
            raise UserError(
                "no TensorRT flavour is installed; "
                f"{INSTALL_HINTS[TENSORRT_RTX]}, or {INSTALL_HINTS[TENSORRT]}"
            )
        errors: list[str] = []
        for candidate in present:  # FLAVORS order: tensorrt first
            try:
                return _import_flavor(candidate)
            except UserError as e:
                errors.append(str(e))
        raise UserError(" / ".join(errors))
    if name not in FLAVORS:
        raise UserError(f"unknown TensorRT flavour {flavor!r}; choose auto, {', '.join(FLAVORS)}")
    return _import_flavor(name)
