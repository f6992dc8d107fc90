"""manifest.json: the one truth about an artifact directory.

It records the recipe, the source checkpoint, every component's declaration and files (with sha256),
the tokenizer files and special tokens, preprocessing parameters, the family's runtime settings and
the versions that produced it. Loading refuses, with one line, anything it cannot trust:
- the manifest as a whole against its schema (runtime/manifest_schema.py: types, required keys,
  the schema version as an integer), naming the bad key;
- every path in it: relative, normalized, and inside the directory after following symbolic links
  (artifact/paths.py); every file the runtime opens is in the hashed `files` list;
- every component graph's external-data locations (read from the .onnx without the onnx package,
  artifact/onnx_refs.py): each must be one of the component's hashed data files, so ONNX Runtime
  never opens anything else;
- every listed file's sha256, so a half-copied or edited artifact is refused instead of producing
  garbage.

Hashing gigabytes of weights on every start is slow on small devices (3 GB: 2.6-5.6 s here, more on
a Jetson), so `.verified.json` next to the manifest remembers, per file, what `stat` said when its
sha256 last matched: size, mtime_ns, ctime_ns, inode and device. A file whose record still matches
is not read again. Copying, rewriting or replacing a file changes its inode or ctime, and a user
cannot set a file's ctime back (`touch` and `os.utime` set mtime, and doing so moves ctime), so an
in-place edit with a restored mtime is hashed too. What the record cannot see: a change that
bypasses the filesystem (silent disk corruption, a raw write to the block device). `rehash=True`
(`mmexport verify`, `mmexport run --rehash`) hashes everything regardless. The record is best
effort: a directory that cannot be written is hashed every time; it is read without following a
symbolic link and written by exclusive create + rename (artifact/files.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..artifact.files import atomic_write, decode_utf8, open_checked, open_regular
from ..artifact.onnx_refs import OnnxScanError, external_data_refs
from ..artifact.paths import check_relpath, resolve_inside
from ..artifact.files import sha256_file, sha256_stream
from ..errors import UserError
from ..spec import ComponentSpec
from .manifest_schema import SCHEMA_VERSION, validate_manifest

__all__ = ["SCHEMA_VERSION", "MANIFEST", "VERIFIED", "Manifest", "sha256_file", "check_file_hashes", "load_manifest", "write_manifest"]

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # {rel: {"stat": [size, mtime_ns, ctime_ns, inode, device], "sha256": ...}}


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
        return self.path(self.data["components"][name]["file"])

    def component_sha256(self, name: str) -> str:
        return self.data["components"][name]["sha256"]

    def prefill_file(self, name: str) -> Path | None:
        """The component's graph for prompts, where the build made one (`--prefill-quant-method`), else None."""
        g = self.data["components"][name].get("prefill")
        return self.path(g["file"]) if g else None

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
        """root / rel, refused (UserError) if `rel` is not a normalized path inside the directory."""
        return resolve_inside(self.root, rel, f"{self.root / MANIFEST}: {rel}")

    def read_text(self, rel: str) -> str:
        """A text file of the artifact (tokenizer, chat template), as UTF-8."""
        return decode_utf8(_read_inside(self.root, rel), self.root / rel)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _open_inside(root: Path, rel: str) -> BinaryIO:
    p = resolve_inside(root, rel, f"{root / MANIFEST}: files entry")
    return open_checked(p, f"{root}: {rel}", missing=f"{root}: missing file {rel} (listed in {MANIFEST}); rebuild or copy it again")


def _read_inside(root: Path, rel: str) -> bytes:
    with _open_inside(root, rel) as f:
        return f.read()


def _read_verified(root: Path) -> dict[str, Any]:
    try:
        with open_regular(root / VERIFIED, nofollow=True) as f:
            data = json.loads(f.read().decode("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UserError):  # absent, a symbolic link, not a regular file, unreadable or corrupt: start afresh
        return {}


def _write_verified(root: Path, record: dict[str, Any]) -> None:
    try:
        atomic_write(root / VERIFIED, json.dumps(record, indent=1, sort_keys=True) + "\n")
    except OSError:  # read-only media, a full disk: hash every time
        pass


def check_file_hashes(root: Path, files: dict[str, str], rehash: bool = False) -> int:
    """Check every listed file against its sha256 (see the module doc); returns how many were hashed."""
    record = _read_verified(root)
    hashed = 0
    changed = False
    for rel, want in files.items():
        with _open_inside(root, rel) as f:
            key = _stat_key(os.fstat(f.fileno()))
            if not rehash and record.get(rel) == {"stat": key, "sha256": want}:
                continue
            hashed += 1
            got = sha256_stream(f)
        if got != want:
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


def check_external_data(root: Path, data: dict[str, Any]) -> None:
    """Every external-data location in every component graph is one of the component's data files."""
    graphs = [(f"components.{name}", c) for name, c in data["components"].items()]
    graphs += [(f"components.{name}.prefill", c["prefill"]) for name, c in data["components"].items() if "prefill" in c]
    for where, c in graphs:
        rel = c["file"]
        path = resolve_inside(root, rel, f"{root / MANIFEST}: {where}.file")
        if not path.exists():
            continue  # reported by the hash check when files are checked
        try:
            refs = external_data_refs(path)
        except OnnxScanError as e:
            raise UserError(f"{root}: {rel} is not a readable ONNX file ({e}); rebuild") from None
        except OSError as e:
            raise UserError(f"{root}: cannot read {rel} ({e.strerror})") from None
        allowed = set(c["data_files"])
        for tensor, loc in refs:
            what = f"{root}: {rel}: external data of tensor {tensor!r}"
            check_relpath(loc, what)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), loc))
            if target not in allowed:
                raise UserError(f"{what} is read from {loc}, which is not one of the component's hashed data files")


def load_manifest(root: Path | str, check_files: bool = True, rehash: bool = False) -> Manifest:
    """Read and check an artifact directory's manifest (see the module doc). `check_files`: also check
    every file's sha256 (`rehash`: even those `.verified.json` vouches for)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"artifact directory not found: {root}" if not root.exists() else f"{root}: not a directory")
    mpath = root / MANIFEST
    if not os.path.lexists(mpath):
        raise UserError(f"{root}: no {MANIFEST} (not an mmexport artifact directory, or an unfinished build)")
    try:
        data = json.loads(decode_utf8(_read_inside(root, MANIFEST), mpath))
    except json.JSONDecodeError as e:
        raise UserError(f"{mpath}: corrupt manifest ({e})") from None
    try:
        validate_manifest(data)
        for rel in data["files"]:
            resolve_inside(root, rel, "files entry")
    except UserError as e:
        raise UserError(f"{mpath}: {e}") from None
    if check_files:
        check_file_hashes(root, data["files"], rehash=rehash)
    check_external_data(root, data)
    return Manifest(root, data)


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    """Record the sha256 of every listed file, then write manifest.json."""
    data = dict(data)
    data["schema_version"] = SCHEMA_VERSION
    data["files"] = {rel: sha256_file(root / rel) for rel in sorted(data.get("files", {}))}
    atomic_write(root / MANIFEST, json.dumps(data, indent=2, sort_keys=False) + "\n")
    # the hashes were just taken: the first load need not read the files again
    _write_verified(root, {rel: {"stat": _stat_key(os.stat(root / rel)), "sha256": h} for rel, h in data["files"].items()})
