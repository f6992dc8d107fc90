"""The machine a bench ran on, and its default request image."""
from __future__ import annotations

import os
import platform
from typing import Any

from .memory import MB


def default_image(size: int = 448):
    """A deterministic size x size RGB picture: shapes on a gradient background."""
    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.stack([40 + xx * 150 // size, 90 + yy * 120 // size, 200 - (xx + yy) * 80 // (2 * size)], -1)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    s = size / 448
    d.ellipse([60 * s, 60 * s, 200 * s, 200 * s], fill=(230, 60, 50), outline=(20, 20, 20), width=max(1, int(4 * s)))
    d.rectangle([250 * s, 80 * s, 400 * s, 190 * s], fill=(250, 210, 40))
    d.polygon([(120 * s, 400 * s), (220 * s, 240 * s), (320 * s, 400 * s)], fill=(40, 160, 80))
    d.line([(20 * s, 430 * s), (430 * s, 230 * s)], fill=(255, 255, 255), width=max(1, int(6 * s)))
    for i in range(6):
        c = (330 * s + 18 * s * (i % 3), 260 * s + 18 * s * (i // 3))
        d.ellipse([c[0] - 6 * s, c[1] - 6 * s, c[0] + 6 * s, c[1] + 6 * s], fill=(20, 20, 120))
    return im


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(with_torch: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import psutil

        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_total_mb"] = round(psutil.virtual_memory().total / MB)
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    info["mmexport_threads"] = os.environ.get("MMEXPORT_THREADS") or "default"
    info["ort_spinning"] = os.environ.get("MMEXPORT_ORT_SPINNING") or "decoder only"
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        try:
            import transformers

            info["transformers"] = transformers.__version__
        except ImportError:
            pass
    return info
