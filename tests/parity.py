"""Shared test helper: `mmexport run --json` on a build against transformers' greedy `generate` on the same
checkpoint, through the family's processor path and chat template (the adapter's `reference_inputs`)."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def run_vs_generate(art: Path, ckpt: Path, family: str, prompt: str, images: list[Path], tokens: int = 12) -> dict:
    """Run the build and transformers on one request; returns both token lists (transformers' cut before its
    first EOS, where the runtime stops)."""
    import torch

    from mmexport.families import get_adapter
    from mmexport.runtime.image import load_image
    from mmexport.runtime.prompt import user_message

    args = ["run", art, "--prompt", prompt, "--max-new-tokens", str(tokens), "--json"]
    for im in images:
        args += ["--image", im]
    ours = json.loads(run_cli(*args).stdout)["token_ids"]
    adapter = get_adapter(family)
    model = adapter.load(ckpt)
    inputs = adapter.reference_inputs(model, ckpt, user_message(prompt, len(images)), [load_image(p) for p in images])
    with torch.no_grad():
        ref = adapter.reference_generate(model, inputs, tokens)
    eos = set(json.loads((art / "manifest.json").read_text())["tokenizer"]["eos_token_ids"])
    cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))  # the runtime stops before an EOS
    ref = ref[:cut]
    return {"ours": ours, "transformers": ref}
