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


def parallel_builds(jobs: dict[str, tuple], root: Path, timeout: int = 900) -> dict[str, Path]:
    """`mmexport ARGS --out root/NAME` for every job, run side by side as subprocesses; asserts each succeeded."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "mmexport", *map(str, args), "--out", str(root / name)], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in jobs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"build {name}: exit {proc.returncode}\n{out}\n{err}"
    return {name: root / name for name in jobs}


def blocked_env(root: Path) -> dict[str, str]:
    """PYTHONPATH for a subprocess in which `import torch` and `import transformers` fail (the runtime must not need them)."""
    from conftest import REPO

    block = root / "torch-blocked"
    for mod in ("torch", "transformers"):
        (block / mod).mkdir(parents=True, exist_ok=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    return {"PYTHONPATH": f"{block}:{REPO}"}
