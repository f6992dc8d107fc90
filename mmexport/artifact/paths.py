"""Paths inside an artifact directory.

A manifest is data from disk, possibly from someone else: every path in it must be relative,
normalized (no `.`, `..`, empty or backslash parts) and, after following symbolic links, inside
the artifact directory. `resolve_inside` is the one gate every manifest path goes through.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError


def check_relpath(rel: Any, what: str) -> str:
    """`rel` if it is a normalized relative POSIX path (the only form a manifest may hold), else UserError naming `what`."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{what}: expected a relative path, got {rel!r}")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise UserError(f"{what}: {rel!r} is an absolute path; a manifest holds only paths inside the artifact directory")
    if "\\" in rel or "\x00" in rel:
        raise UserError(f"{what}: {rel!r} is not a plain relative path (backslash or NUL)")
    parts = rel.split("/")
    if ".." in parts:
        raise UserError(f"{what}: {rel!r} leaves the artifact directory ('..')")
    if any(p in ("", ".") for p in parts):
        raise UserError(f"{what}: {rel!r} is not normalized")
    return rel


def is_inside(real_root: str, real: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def resolve_inside(root: Path, rel: Any, what: str) -> Path:
    """`root / rel` after checking that `rel` is a normalized relative path (`check_relpath`) and that
    it does not lead out of `root` through a symbolic link. Returns the path under `root` (not the
    resolved one), so relative references next to it resolve as the writer meant."""
    check_relpath(rel, what)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if not is_inside(real_root, real):
        raise UserError(f"{what}: {rel} leads outside the artifact directory (through a symbolic link, to {real})")
    return Path(root) / rel
