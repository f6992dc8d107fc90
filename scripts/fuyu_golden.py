"""Golden data for Fuyu's preprocessing and prompt: transformers' own FuyuProcessor with its torchvision image
processor (FuyuImageProcessor), unmodified, on the fuyu-tiny recipe's synthetic checkpoint.

transformers 5.x's PIL image processor cannot run inside FuyuProcessor (see mmexport/families/fuyu/reference.py),
and torchvision is not a dependency of mmexport, so this runs in an environment with torchvision and writes
tests/data/fuyu_golden.npz, which tests/test_fuyu.py compares the torch-free runtime with (1e-5 on pixels, token ids
identical). Run from the repository root:

    PYTHONPATH=. /path/to/torchvision-venv/bin/python scripts/fuyu_golden.py [OUT.npz]

The checkpoint's tokenizer.json sha256 is stored with the data: the test refuses stale golden data.
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "fuyu_golden.npz"

# A 60x90 canvas (2 x 3 patches; the recipe's is 120x180) keeps the file small. (height, width, prompt): odd sizes
# around it: smaller (padded, cropped to whole patches), larger in one or both sides (resized down with bilinear,
# then padded), exactly the canvas
CANVAS = {"height": 60, "width": 90}
CASES = (
    (61, 37, "Describe this."),
    (20, 75, "What is written here?\n"),
    (17, 23, "A short caption:"),
    (93, 115, "Count the shapes."),
    (31, 200, "Where is the <box>10, 20, 30, 40</box> box?"),
    (60, 90, "Hello"),
)


def image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth gradient with a little noise (compresses well; still exercises the resize)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), ((xx + yy) * 5) % 256], -1)
    return np.clip(base + rng.integers(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def main(out: Path = OUT) -> None:
    from PIL import Image
    from transformers import AutoTokenizer, FuyuProcessor
    from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor

    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    recipe = load_recipe("fuyu-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "fuyu-tiny"
        for part in get_adapter("fuyu").synthetic_parts(recipe.synthetic):
            part.save_pretrained(ckpt)
        proc = FuyuProcessor(image_processor=FuyuImageProcessor.from_pretrained(ckpt, size=CANVAS), tokenizer=AutoTokenizer.from_pretrained(ckpt))
        assert proc.image_processor.size["height"] == CANVAS["height"]
        data: dict[str, np.ndarray] = {"canvas": np.array([CANVAS["height"], CANVAS["width"]]), "tokenizer_sha256": np.array(hashlib.sha256((ckpt / "tokenizer.json").read_bytes()).hexdigest())}
        for i, (h, w, prompt) in enumerate(CASES):
            arr = image(h, w, i)
            enc = proc(images=Image.fromarray(arr), text=prompt, return_tensors="pt", return_legacy_image_output=False)
            data[f"image_{i}"] = arr
            data[f"prompt_{i}"] = np.array(prompt)
            data[f"input_ids_{i}"] = enc["input_ids"][0].numpy()
            data[f"pixel_values_{i}"] = enc["pixel_values"].numpy().astype(np.float32)
        text = proc(text="Write one sentence about the sea.", return_tensors="pt")
        data["text_prompt"] = np.array("Write one sentence about the sea.")
        data["text_input_ids"] = text["input_ids"][0].numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **data)
    print(f"{out}: {len(CASES)} image cases + text-only, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
