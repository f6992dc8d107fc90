"""Golden prompts from transformers' real PixtralProcessor for the mistral3-tiny checkpoint.

PixtralProcessor's module imports the torchvision image processor, so it cannot load in an environment without
torchvision (this repo's). Run this script once with an interpreter that has torchvision and the same
transformers, from the repository root:

    MMEXPORT_CACHE=... PYTHONPATH=. /path/to/torchvision-venv/bin/python scripts/mistral3_processor_golden.py \
        tests/data/mistral3_processor.npz

It builds (or reuses) the mistral3-tiny synthetic checkpoint, runs PixtralProcessor (with the checkpoint's
tokenizer, chat template, patch_size * spatial_merge_size, and the PIL image processor) on the chat-rendered
prompts of `CASES` with the images of `golden_images()`, and stores per case the processor's input_ids, the
image sizes it resized to and the expanded text. tests/test_mistral3.py compares mmexport's prompt with them
(and, when MMEXPORT_TORCHVISION_VENV names such an interpreter's venv, reruns this script live).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# (case name, prompt, image indices into golden_images())
CASES = [
    ("two_images", "What differs between these?", [0, 1]),
    ("three_images", "Describe them.", [2, 3, 4]),
    ("one_image", "What is it?", [5]),
    ("text_only", "Write one sentence about rivers.", []),
]

# an explicit system turn: the template's default one holds today's date
SYSTEM = [{"role": "system", "content": [{"type": "text", "text": "You answer in one short sentence."}]}]

# odd sizes: portrait, landscape, a thin strip, a tiny image, one larger than longest_edge (shrunk), a square
SIZES = [(97, 211), (333, 65), (40, 150), (5, 3), (700, 500), (128, 128)]


def golden_images():
    from PIL import Image

    out = []
    for i, (h, w) in enumerate(SIZES):
        rng = np.random.default_rng(100 + i)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
        out.append(Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


def messages(prompt: str, num_images: int) -> list[dict]:
    from mmexport.runtime.prompt import user_message

    return SYSTEM + user_message(prompt, num_images)


def main(out: Path) -> None:
    import json

    from transformers import AutoTokenizer, PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from mmexport.checkpoints import resolve_source
    from mmexport.families import get_adapter
    from mmexport.recipes import load_recipe

    ckpt, _ = resolve_source(load_recipe("mistral3-tiny"), None, get_adapter("mistral3"), log=lambda m: None)
    pcfg = json.loads((ckpt / "processor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    proc = PixtralProcessor(image_processor=PixtralImageProcessorPil.from_pretrained(ckpt, local_files_only=True), tokenizer=tok,
                            patch_size=pcfg["patch_size"], spatial_merge_size=pcfg["spatial_merge_size"])
    images = golden_images()
    data: dict[str, np.ndarray] = {}
    for name, prompt, idx in CASES:
        text = tok.apply_chat_template(messages(prompt, len(idx)), tokenize=False, add_generation_prompt=True)
        enc = proc(text=text, images=[images[i] for i in idx] or None, return_tensors="np")
        ids = enc["input_ids"][0]
        data[f"{name}/input_ids"] = ids.astype(np.int64)
        data[f"{name}/image_sizes"] = np.asarray(enc["image_sizes"] if idx else np.zeros((0, 2)), dtype=np.int64)
        data[f"{name}/text"] = np.asarray(tok.decode(ids.tolist(), skip_special_tokens=False))
    np.savez_compressed(out, **data)
    counts = ", ".join(f"{n} {len(data[n + '/input_ids'])} tokens" for n, _, _ in CASES)
    print(f"wrote {out}: {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/data/mistral3_processor.npz"))
