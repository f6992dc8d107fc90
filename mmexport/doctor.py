"""`mmexport doctor`: what this machine can do with mmexport, and why not.

Reports Python, the platform, numpy, ONNX Runtime (version, execution providers), whether torch /
transformers / onnx are installed (found, never imported: importing torch takes seconds and is what the
runtime avoids), the TensorRT flavours and versions, cuda-python, the CUDA driver and GPU (compute
capability, through libcuda with ctypes), on Jetson the board model and L4T release, and the CPU's int8
dot-product instructions (which quantization runs fast on it). Then the capabilities with their reasons:
can_export, can_build_engines, can_run_engines, can_run_onnx.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import platform
import re
import sys
from pathlib import Path
from typing import Any

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _package(module: str, *dists: str) -> dict[str, Any]:
    """{installed, version} without importing the module."""
    present = _found(module)
    return {"installed": present, "version": _dist_version(*(dists or (module,))) if present else None}


def _onnxruntime() -> dict[str, Any]:
    info: dict[str, Any] = {"installed": _found("onnxruntime"), "version": None, "providers": []}
    if info["installed"]:
        try:
            import onnxruntime as ort

            info["version"] = ort.__version__
            info["providers"] = list(ort.get_available_providers())
        except Exception as e:  # a broken install
            info["error"] = f"{type(e).__name__}: {e}"
    return info


def _tensorrt_flavors() -> dict[str, dict[str, Any]]:
    """Each flavour: installed, version, module, error (when present but not importable)."""
    from .runtime.flavors import _MODULES, FLAVORS

    out: dict[str, dict[str, Any]] = {}
    for name in FLAVORS:
        info: dict[str, Any] = {"installed": False, "version": None, "module": None}
        for mod in _MODULES[name]:
            if not _found(mod):
                continue
            info["installed"] = True
            info["module"] = mod
            try:
                m = importlib.import_module(mod)
                info["version"] = str(getattr(m, "__version__", "") or "unknown")
                info.pop("error", None)
                break
            except Exception as e:
                info["error"] = f"`import {mod}` failed: {type(e).__name__}: {e}"
        out[name] = info
    return out


def _cuda_python() -> dict[str, Any]:
    present = _found("cuda.bindings") or _found("cuda.cudart")
    return {"installed": present, "version": _dist_version("cuda-python", "cuda-bindings") if present else None}


def _cuda_driver(device: int = 0) -> dict[str, Any]:
    """The CUDA driver and GPU `device` through libcuda (ctypes): no torch, no cuda-python needed."""
    info: dict[str, Any] = {
        "driver_found": False,
        "driver_version": None,
        "device_count": 0,
        "device_name": None,
        "compute_capability": None,
        "error": None,
    }
    names = ("nvcuda.dll",) if sys.platform.startswith("win") else ("libcuda.so.1", "libcuda.so")
    lib = None
    for n in names:
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        info["error"] = "no CUDA driver (libcuda) found"
        return info
    info["driver_found"] = True
    try:
        rc = lib.cuInit(0)
        if rc != 0:
            info["error"] = f"cuInit failed with CUDA error {rc}" + (" (no CUDA-capable device)" if rc == 100 else "")
            return info
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            info["driver_version"] = f"{v.value // 1000}.{(v.value % 1000) // 10}"
        count = ctypes.c_int()
        if lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            info["device_count"] = count.value
        if info["device_count"] <= device:
            info["error"] = f"no CUDA device {device}"
            return info
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), device) == 0:
            buf = ctypes.create_string_buffer(256)
            if lib.cuDeviceGetName(buf, 256, dev) == 0:
                info["device_name"] = buf.value.decode(errors="replace")
    except (AttributeError, OSError) as e:
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    from .artifact.engines import current_compute_capability

    info["compute_capability"] = current_compute_capability(device)
    return info


def _jetson() -> dict[str, Any] | None:
    """Board model and L4T release on NVIDIA Jetson (None elsewhere)."""
    model = release = None
    try:
        if DEVICE_TREE_MODEL.is_file():
            model = DEVICE_TREE_MODEL.read_bytes().rstrip(b"\x00").decode(errors="replace").strip() or None
    except OSError:
        pass
    try:
        if TEGRA_RELEASE.is_file():
            release = parse_tegra_release(TEGRA_RELEASE.read_text(errors="replace"))
    except OSError:
        pass
    if release is None and not (model and ("jetson" in model.lower() or "nvidia" in model.lower())):
        return None
    return {"model": model, "l4t_release": release}


def parse_tegra_release(text: str) -> str | None:
    """"# R36 (release), REVISION: 4.0, GCID: ..." -> "36.4.0"."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


CPUINFO = Path("/proc/cpuinfo")
# the CPU's int8 dot-product instructions, as Linux names them: what ONNX Runtime's integer GEMMs (dynamic int8,
# MatMulNBits at accuracy level 4) run on; without them u8s8 products can saturate
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def cpu_info(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """The CPU's model, logical cores and int8 dot-product support, read from /proc/cpuinfo (Linux)."""
    info: dict[str, Any] = {"model": platform.processor() or None, "logical_cores": None, "int8_dot_product": []}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return info
    flags: set[str] = set()
    cores = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor":
            cores += 1
        elif key == "model name" and "model_name" not in info:
            info["model_name"] = value.strip()
        elif key == "model" and not value.strip().isdigit() and "board" not in info:  # Arm boards: "Model : ..."
            info["board"] = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    info["model"] = info.pop("model_name", None) or info.pop("board", None) or info["model"]
    info.pop("board", None)
    info["logical_cores"] = cores or None
    info["int8_dot_product"] = [f for f in INT8_DOT_FLAGS if f in flags]
    return info


def doctor() -> dict[str, Any]:
    """What this machine has and can do (JSON-serialisable)."""
    from . import __version__ as mm_version

    numpy_v = _dist_version("numpy") if _found("numpy") else None
    packages = {
        "numpy": {"installed": numpy_v is not None, "version": numpy_v},
        "torch": _package("torch"),
        "transformers": _package("transformers"),
        "onnx": _package("onnx"),
        "onnxscript": _package("onnxscript"),
        "cuda-python": _cuda_python(),
    }
    ort = _onnxruntime()
    flavors = _tensorrt_flavors()
    cuda = _cuda_driver()
    cc = cuda["compute_capability"]
    gpu = cc is not None

    caps: dict[str, dict[str, Any]] = {}
    missing = [n for n in ("torch", "transformers", "onnx", "onnxscript") if not packages[n]["installed"]]
    caps["can_export"] = {
        "ok": not missing,
        "reason": "torch, transformers, onnx and onnxscript are installed"
        if not missing
        else f"missing {', '.join(missing)} (pip install 'mmexport[export]')",
    }
    rtx_ok = flavors["tensorrt-rtx"]["installed"] and flavors["tensorrt-rtx"]["version"] is not None
    trt_ok = flavors["tensorrt"]["installed"] and flavors["tensorrt"]["version"] is not None
    if rtx_ok:
        why = f"tensorrt-rtx {flavors['tensorrt-rtx']['version']} builds engines ahead of time, without a GPU"
        if trt_ok and gpu:
            why += f"; tensorrt {flavors['tensorrt']['version']} builds for this GPU (sm{cc.replace('.', '')})"
        caps["can_build_engines"] = {"ok": True, "reason": why}
    elif trt_ok and gpu:
        caps["can_build_engines"] = {
            "ok": True,
            "reason": f"tensorrt {flavors['tensorrt']['version']} builds for this GPU (sm{cc.replace('.', '')})",
        }
    elif trt_ok:
        caps["can_build_engines"] = {
            "ok": False,
            "reason": f"tensorrt {flavors['tensorrt']['version']} needs a GPU to build ({cuda['error'] or 'no GPU'}); "
            "install tensorrt-rtx to build without one",
        }
    else:
        errs = [f["error"] for f in flavors.values() if f.get("error")]
        caps["can_build_engines"] = {
            "ok": False,
            "reason": "; ".join(errs) if errs else "no TensorRT flavour installed (pip install 'mmexport[tensorrt-rtx]')",
        }
    run_missing = []
    if not gpu:
        run_missing.append(f"no usable NVIDIA GPU ({cuda['error'] or 'compute capability unreadable'})")
    if not (trt_ok or rtx_ok):
        run_missing.append("no TensorRT flavour")
    if not packages["cuda-python"]["installed"]:
        run_missing.append("cuda-python is not installed")
    caps["can_run_engines"] = {
        "ok": not run_missing,
        "reason": "; ".join(run_missing)
        if run_missing
        else f"GPU sm{cc.replace('.', '')} + {'tensorrt' if trt_ok else 'tensorrt-rtx'} + cuda-python",
    }
    caps["can_run_onnx"] = {
        "ok": bool(ort["installed"] and ort["version"]),
        "reason": f"onnxruntime {ort['version']} ({', '.join(ort['providers'])})"
        if ort["version"]
        else (ort.get("error") or "onnxruntime is not installed"),
    }

    return {
        "mmexport": mm_version,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform()},
        "packages": packages,
        "onnxruntime": ort,
        "tensorrt": flavors,
        "cuda": cuda,
        "jetson": _jetson(),
        "cpu": cpu_info(),
        "capabilities": caps,
    }


def render_doctor(d: dict[str, Any], console: Any) -> None:
    """Two Rich tables: the environment, then the capabilities with their reasons."""
    from rich.table import Table

    def ver(info: dict[str, Any]) -> str:
        if not info.get("installed"):
            return "[dim]not installed[/dim]"
        if info.get("error"):
            return f"[red]broken[/red]: {info['error']}"
        return str(info.get("version") or "installed")

    env = Table("", "", title="mmexport doctor", show_header=False)
    env.add_row("mmexport", str(d["mmexport"]))
    env.add_row("python", f"{d['python']['version']} ({d['python']['executable']})")
    p = d["platform"]
    env.add_row("platform", f"{p['system']} {p['release']} {p['machine']}")
    for name, info in d["packages"].items():
        env.add_row(name, ver(info))
    ort = d["onnxruntime"]
    env.add_row("onnxruntime", ver(ort) + (f" [{', '.join(ort['providers'])}]" if ort.get("providers") else ""))
    for name, info in d["tensorrt"].items():
        env.add_row(name, ver(info))
    c = d["cuda"]
    if c["compute_capability"]:
        env.add_row("GPU", f"{c['device_name']} (sm{c['compute_capability'].replace('.', '')}), driver CUDA {c['driver_version']}")
    else:
        env.add_row("GPU", f"[dim]none[/dim] ({c['error']})")
    cpu = d.get("cpu") or {}
    dot = cpu.get("int8_dot_product")
    env.add_row("CPU", f"{cpu.get('model') or '?'}, {cpu.get('logical_cores') or '?'} logical cores; int8 dot products: "
                + (", ".join(dot) + " (--quantize int8 --quant-method dynamic: integer GEMMs)" if dot else
                   "none found (integer GEMMs of dynamic int8 can saturate: prefer block-wise --quantize)"))
    if d.get("jetson"):
        j = d["jetson"]
        env.add_row("Jetson", f"{j.get('model') or '?'}, L4T {j.get('l4t_release') or '?'}")
    console.print(env)

    caps = Table("capability", "", "why")
    for name, cap in d["capabilities"].items():
        caps.add_row(name, "[green]yes[/green]" if cap["ok"] else "[red]no[/red]", cap["reason"])
    console.print(caps)
