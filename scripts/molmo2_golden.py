"""Golden data for Molmo2's torch-free preprocessing, from transformers' real processor (torchvision backend).

Run with a Python that has torch, torchvision and transformers (mmexport itself needs no torchvision):

    PYTHONPATH=. TV_VENV/bin/python scripts/molmo2_golden.py tests/data/molmo2_golden.npz   (TV_VENV: scripts/torchvision_venv.sh)

For each processor configuration and image it stores what `Molmo2ImageProcessor` returns —
`image_token_pooling`, `image_grids`, `image_num_crops`, and the pixels as the uint8 levels they normalize
from (`level = x * std * 255 + mean * 255`; the script checks that normalizing those levels again gives the
processor's float32 values bit for bit, so nothing is lost; stored as crops of pixels differenced along their
rows, so the file stays small) — and, for the tiny
recipe's tokenizer and chat template, what `Molmo2Processor` makes of a prompt with two images and of a
text-only one (`input_ids`, `mm_token_type_ids`). tests/test_molmo2.py compares the runtime with this file,
and re-runs this script when MMEXPORT_TORCHVISION_VENV names such a Python environment.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# processor configurations: the released checkpoints' (Molmo2-4B's preprocessor_config.json), the tiny
# recipe's, and one with CLIP statistics, other margins and 3x3 pooling
CONFIGS = {
    "real": {"size": {"height": 378, "width": 378}, "max_crops": 8, "overlap_margins": [4, 4], "patch_size": 14,
             "pooling_size": [2, 2], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "tiny": {"size": {"height": 378, "width": 378}, "max_crops": 2, "overlap_margins": [4, 4], "patch_size": 14,
             "pooling_size": [2, 2]},
    "clip": {"size": {"height": 378, "width": 378}, "max_crops": 4, "overlap_margins": [2, 3], "patch_size": 14,
             "pooling_size": [3, 3], "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]},
}
SIZES = {"real": [(37, 211), (123, 77), (301, 299), (420, 700)], "tiny": [(97, 211), (333, 65), (250, 410)],
         "clip": [(640, 33), (200, 500)]}
PROMPT_IMAGES = [(97, 211), (333, 65)]  # the tiny case's first two images, in one prompt


def make_image(h: int, w: int, seed: int):
    """A deterministic test image: gradients and a seed-dependent pattern of sharp edges (no random noise, so
    the golden file compresses well; the edges exercise every resize weight)."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), ((xx // (3 + seed % 5) + yy // 5) * (37 + seed)) % 256], -1)
    return Image.fromarray(base.astype(np.uint8))


def to_raster(pv: np.ndarray, patch: int) -> np.ndarray:
    """[crops, P, p*p*3] patches -> [crops, S, S, 3] images (the crops as pixels, for compression and reading)."""
    n, p_count, _ = pv.shape
    g = int(round(p_count**0.5))
    return pv.reshape(n, g, g, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * patch, g * patch, 3)


def levels(pv: np.ndarray, mean, std) -> np.ndarray:
    """float32 pixels [crops, P, p*p*3] -> the uint8 levels they were normalized from (checked exact)."""
    m = np.asarray(mean, np.float32) * np.float32(255.0)
    s = np.asarray(std, np.float32) * np.float32(255.0)
    x = pv.reshape(*pv.shape[:-1], -1, 3)
    lv = np.rint(x.astype(np.float64) * s + m)
    assert lv.min() >= 0 and lv.max() <= 255
    lv = lv.astype(np.uint8)
    back = (lv.astype(np.float32) - m) / s
    assert np.array_equal(back, x), "normalized levels do not reproduce the processor's pixels"
    return lv.reshape(pv.shape)


def deltas(raster: np.ndarray) -> np.ndarray:
    """uint8 [crops, H, W, 3] -> differences along W (mod 256), which compress far better; `undelta` inverts."""
    return np.diff(raster, axis=2, prepend=np.zeros_like(raster[:, :, :1])).astype(np.uint8)


def undelta(d: np.ndarray) -> np.ndarray:
    return np.cumsum(d.astype(np.int64), axis=2).astype(np.uint8)  # the sum mod 256 = the levels


def main(out: Path) -> None:
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
    from transformers.models.molmo2.processing_molmo2 import Molmo2Processor
    from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

    from mmexport.families.molmo2.export import IMAGE_SPECIAL, TEXT_SPECIAL, chat_template
    from mmexport.synthetic import train_bpe_tokenizer

    data: dict[str, np.ndarray] = {}
    seed = 0
    for name, cfg in CONFIGS.items():
        ip = Molmo2ImageProcessor(**cfg)
        for h, w in SIZES[name]:
            seed += 1
            key = f"{name}/{h}x{w}"
            img = make_image(h, w, seed)
            r = ip(images=[img], return_tensors="np")
            data[f"{key}/level_deltas"] = deltas(to_raster(levels(r["pixel_values"], ip.image_mean, ip.image_std), cfg["patch_size"]))
            for k in ("image_token_pooling", "image_grids", "image_num_crops"):
                data[f"{key}/{k}"] = np.asarray(r[k])
    # the processor's prompt: the tiny recipe's tokenizer (trained in-repo, deterministic) and chat template
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(TEXT_SPECIAL + IMAGE_SPECIAL, 1024),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    proc = Molmo2Processor(image_processor=Molmo2ImageProcessor(**CONFIGS["tiny"]), video_processor=Molmo2VideoProcessor(),
                           tokenizer=tok, chat_template=chat_template())
    images = [make_image(h, w, 1 + len(SIZES["real"]) + i) for i, (h, w) in enumerate(PROMPT_IMAGES)]
    for case, imgs in (("two_images", images), ("text_only", [])):
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": "What differs?"}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        r = proc(text=text, images=imgs or None, return_tensors="np")
        data[f"prompt/{case}/input_ids"] = np.asarray(r["input_ids"][0])
        data[f"prompt/{case}/mm_token_type_ids"] = np.asarray(r["mm_token_type_ids"][0])
    data["versions"] = np.asarray([torch.__version__, __import__("torchvision").__version__, transformers.__version__,
                                   str(torch.get_num_threads())])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **data)
    print(f"{out}: {len(data)} arrays, {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "data" / "molmo2_golden.npz")
