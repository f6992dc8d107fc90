"""manifest.json: the one truth about an artifact directory.

It records the recipe, the source checkpoint, every component's declaration and files (with sha256),
the tokenizer files and special tokens, preprocessing parameters, the family's runtime settings and
the versions that produced it. Loading checks the schema version and every file's sha256, so a
half-copied or edited artifact is refused with one line instead of producing garbage.

Hashing gigabytes of weights on every start is slow on small devices (3 GB: 2.6-5.6 s here, more on
a Jetson), so `.verified.json` next to the manifest remembers, per file, the size, mtime and inode it
had when its sha256 last matched: a file unchanged since then is not read again. Copying, rewriting
or replacing a file changes its mtime or inode and gets it hashed; `rehash=True` (what `mmexport
verify` does) hashes everything regardless. The record is best effort: a directory that cannot be
written is simply hashed every time.
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
VERIFIED = ".verified.json"  # {rel: {"stat": [size, mtime_ns, inode], "sha256": ...}}


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


def _stat_key(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_verified(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verified(root: Path, record: dict[str, Any]) -> None:
    tmp = root / (VERIFIED + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        tmp.replace(root / VERIFIED)
    except OSError:  # read-only media: hash every time
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def check_file_hashes(root: Path, files: dict[str, str], rehash: bool = False) -> int:
    """Check every listed file against its sha256 (see the module doc); returns how many were hashed."""
    record = _read_verified(root)
    hashed = 0
    changed = False
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            raise UserError(f"{root}: missing file {rel} (listed in {MANIFEST}); rebuild or copy it again")
        key = _stat_key(p)
        if not rehash and record.get(rel) == {"stat": key, "sha256": want}:
            continue
        hashed += 1
        if sha256_file(p) != want:
            record.pop(rel, None)
            _write_verified(root, record)
            raise UserError(f"{root}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified); rebuild")
        record[rel] = {"stat": key, "sha256": want}
        changed = True
    stale = set(record) - set(files)
    for rel in stale:
        del record[rel]
    if changed or stale:
        _write_verified(root, record)
    return hashed


def load_manifest(root: Path | str, check_files: bool = True, rehash: bool = False) -> Manifest:
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
        check_file_hashes(root, data.get("files", {}), rehash=rehash)
    return Manifest(root, data)


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    """Record the sha256 of every listed file, then write manifest.json."""
    data = dict(data)
    data["schema_version"] = SCHEMA_VERSION
    data["files"] = {rel: sha256_file(root / rel) for rel in sorted(data.get("files", {}))}
    (root / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    # the hashes were just taken: the first load need not read the files again
    _write_verified(root, {rel: {"stat": _stat_key(root / rel), "sha256": h} for rel, h in data["files"].items()})
