"""`mmexport triton DIR --out REPO`: a Triton Inference Server model repository that serves a build.

  REPO/NAME/config.pbtxt      Python backend, decoupled (streamed tokens), instance groups, the inputs and
                              outputs Triton's LLM tooling speaks (text_input, image_bytes_input,
                              max_tokens, temperature, top_p, seed, stream -> text_output, token_ids)
  REPO/NAME/1/model.py        mmexport/serve/triton_model.py: the torch-free runtime behind one
                              continuous-batching engine per instance
  REPO/NAME/1/artifact/       the build (hard links where the file system allows, else copies), unless
                              --artifact-path names where the build is on the serving machine

The repository is written to a temporary sibling and renamed into place; an existing REPO/NAME is
replaced only with --force and only if mmexport wrote it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..runtime.manifest import MANIFEST, load_manifest

MARKER = "# written by `mmexport triton`"

_INPUTS = [  # name, Triton type, dims, optional
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("image_bytes_input", "TYPE_STRING", "[ -1 ]", True),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
]
_OUTPUTS = [("text_output", "TYPE_STRING", "[ -1 ]"), ("token_ids", "TYPE_INT32", "[ -1 ]")]


def config_pbtxt(name: str, instances: int, kind: str, params: dict[str, str], decoupled: bool = True) -> str:
    ins = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}' + ("\n    optional: true" if opt else "") + "\n  }"
        for n, t, d, opt in _INPUTS
    )
    outs = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n  }}' for n, t, d in _OUTPUTS)
    ps = "\n".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}' for k, v in params.items())
    return (
        f"{MARKER}\n"
        f'name: "{name}"\nbackend: "python"\n'
        "# requests are batched inside each instance (continuous batching over the KV cache), not by Triton\n"
        "max_batch_size: 0\n"
        + ("# decoupled: a request gets one response per generated token unless its `stream` input is false\n"
           if decoupled else "# not decoupled: one response per request (KServe v2 `infer` clients); no streaming\n")
        + f"model_transaction_policy {{\n  decoupled: {'true' if decoupled else 'false'}\n}}\n"
        f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        f"{ps}\n"
    )


def write_repository(artifacts: Path, out: Path, name: str | None = None, instances: int = 1, max_batch: int | None = None,
                     backend: str = "ort", kind: str = "cpu", artifact_path: str | None = None, force: bool = False,
                     decoupled: bool = True) -> Path:
    """Write the model repository; returns REPO/NAME."""
    m = load_manifest(artifacts)  # a complete, intact build (every file's hash checked)
    name = name or str(m.data["recipe"].get("name") or Path(artifacts).resolve().name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and '.'")
    build_batch = int(m.limits.get("max_batch", 1))
    if max_batch is not None and max_batch > build_batch:
        raise UserError(f"--max-batch {max_batch}: this build's decoder takes at most {build_batch} rows")
    if kind not in ("cpu", "gpu"):
        raise UserError(f"--kind must be cpu or gpu, got {kind!r}")
    if backend not in ("ort", "trt"):
        raise UserError(f"--backend must be ort or trt, got {backend!r}")
    model_dir = out / name
    if model_dir.exists() or model_dir.is_symlink():
        cfg = model_dir / "config.pbtxt"
        if not force:
            raise UserError(f"{model_dir} already exists; pass --force to replace it")
        if model_dir.is_symlink() or not cfg.is_file() or not cfg.read_text().startswith(MARKER):
            raise UserError(f"{model_dir} exists and was not written by `mmexport triton`; not replacing it")
    out.mkdir(parents=True, exist_ok=True)
    params = {"artifact_dir": artifact_path or "artifact", "backend": backend, "max_batch": str(max_batch or build_batch)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.writing-", dir=out))
    try:
        version = tmp / "1"
        version.mkdir()
        (version / "model.py").write_text(resources.files("mmexport.serve").joinpath("triton_model.py").read_text())
        if artifact_path is None:
            _link_build(m.root, version / "artifact", [MANIFEST, *m.data["files"]])
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, instances, "KIND_GPU" if kind == "gpu" else "KIND_CPU", params, decoupled))
        mask = os.umask(0)
        os.umask(mask)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700; the build's linked files keep their own modes
            if p.is_dir() or p.parent == tmp or p.parent == version:
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def _link_build(src: Path, dest: Path, files: list[str]) -> None:
    """The manifest's files (and the manifest), hard-linked when possible, else copied; nothing else."""
    for rel in files:
        s, d = src / rel, dest / rel
        if not d.resolve().is_relative_to(dest.resolve()):
            raise UserError(f"{src}: manifest file {rel!r} leaves the artifact directory")
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
