"""What padding every window to whole size costs in Qwen2.5-VL's exported vision encoder.

Builds a Qwen2.5-VL checkpoint with the 3B/7B vision tower's width (1280, 16 heads, MLP 3420, 112-pixel windows:
4x4 merge units = 64 patches per window) at a reduced depth (default 8 blocks, full attention in the last, the
real 7:1 ratio of windowed to full blocks), seeded weights and a tiny text model; exports it with
`mmexport build` and, for images of several sizes, reports the padded slots of the windowed attention, the
vision encoder's time in ONNX Runtime, the share of that time spent in the windowed attention (its gathers,
score / softmax / value products: ONNX Runtime's per-node profile, nodes with a [num_windows, ...] or
[num_windows * window_patches, ...] tensor), and transformers' eager tower on the same pixels.

    python scripts/window_padding.py [--depth 8] [--threads 2] [--repeat 3] [--out /tmp/window-padding]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = ((448, 448), (476, 476), (480, 640), (720, 1280))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/window-padding"))
    a = ap.parse_args()

    import onnxruntime as ort
    import torch
    from PIL import Image

    from mmexport.families import get_adapter
    from mmexport.runtime.pipeline import Pipeline

    torch.set_num_threads(a.threads)
    ck, art = a.out / "checkpoint", a.out / "artifacts"
    adapter = get_adapter("qwen2_5_vl")
    if not (ck / "config.json").is_file():
        syn = {
            "vision_config": dict(depth=a.depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=128,
                                  window_size=112, fullatt_block_indexes=[a.depth - 1], hidden_act="silu"),
            "text_config": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6])),
            "preprocessor": dict(min_pixels=3136, max_pixels=1280 * 28 * 28),
            "init_std": 0.02,
        }
        for part in adapter.synthetic_parts(syn):
            part.save_pretrained(ck)
    if not (art / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "mmexport", "build", str(ck), "--out", str(art), "--force"], check=True)
    model = adapter.load(ck)
    pipe = Pipeline(art)
    onnx_path = str(art / "onnx" / "vision_encoder.onnx")

    def session(profile: str | None = None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(a.out / profile)
        return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    def median_ms(fn) -> float:
        fn()  # warm-up
        t = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return round(1e3 * float(np.median(t)), 1)

    timed = session()
    rng = np.random.default_rng(0)
    rows = []
    for h, w in SIZES:
        img = pipe.family.preprocess(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        lay = pipe.family.layout(img)
        feeds = pipe.family.vision_feeds(img)
        windows, slots = lay.window_index.shape
        n = len(lay.patch_slots)
        pv, grid = torch.from_numpy(img.pixel_values), torch.tensor([img.grid_thw])
        with torch.no_grad():
            eager = median_ms(lambda: model.model.visual(pv, grid_thw=grid))
        ours = median_ms(lambda: timed.run(None, feeds))
        prof = session(f"profile-{w}x{h}")
        prof.run(None, feeds)
        total = windowed = 0.0
        for e in json.loads(Path(prof.end_profiling()).read_text()):
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            shapes = [v for s in e["args"].get("input_type_shape", []) + e["args"].get("output_type_shape", []) for v in s.values()]
            total += e["dur"]
            if any((len(s) == 4 and s[0] == windows) or (len(s) == 3 and s[0] == windows * slots != n) for s in shapes):
                windowed += e["dur"]
        rows.append(dict(size=f"{w}x{h}", grid=list(img.grid_thw[1:]), patches=n, windows=windows, slots=windows * slots,
                         padding=round(lay.padding, 3), ours_ms=ours, eager_ms=eager, windowed_attention_share=round(windowed / total, 3)))
        print(rows[-1], flush=True)
    (a.out / "window_padding.json").write_text(json.dumps(rows, indent=1) + "\n")
    pipe.close()


if __name__ == "__main__":
    main()
