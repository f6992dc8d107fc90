"""manifest.json: the one truth about an artifact directory.

It records the recipe, the source checkpoint, every component's declaration and files (with sha256),
the tokenizer files and special tokens, preprocessing parameters, the family's runtime settings and
the versions that produced it. Loading checks the schema version and every file's sha256, so a
half-copied or edited artifact is refused with one line instead of producing garbage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..spec import ComponentSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def components(self) -> dict[str, ComponentSpec]:
        return {n: ComponentSpec.from_dict(c["spec"]) for n, c in self.data["components"].items()}

    def component_file(self, name: str) -> Path:
        return self.root / self.data["components"][name]["file"]

    def component_sha256(self, name: str) -> str:
        return self.data["components"][name]["sha256"]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def limits(self) -> dict[str, int]:
        return self.data["limits"]

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.data["tokenizer"]

    def path(self, rel: str) -> Path:
        return self.root / rel


def load_manifest(root: Path | str, check_files: bool = True) -> Manifest:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"artifact directory not found: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{root}: no {MANIFEST} (not an mmexport artifact directory, or an unfinished build)")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: corrupt manifest ({e})") from None
    v = data.get("schema_version")
    if v != SCHEMA_VERSION:
        raise UserError(f"{mpath}: schema version {v}, this mmexport reads {SCHEMA_VERSION}; rebuild the artifacts")
    if check_files:
        for rel, want in data.get("files", {}).items():
            p = root / rel
            if not p.is_file():
                raise UserError(f"{root}: missing file {rel} (listed in {MANIFEST}); rebuild or copy it again")
            got = sha256_file(p)
            if got != want:
                raise UserError(f"{root}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified); rebuild")
    return Manifest(root, data)


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    """Record the sha256 of every listed file, then write manifest.json."""
    data = dict(data)
    data["schema_version"] = SCHEMA_VERSION
    data["files"] = {rel: sha256_file(root / rel) for rel in sorted(data.get("files", {}))}
    (root / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
