"""The schema of manifest.json, checked as a whole when an artifact is loaded (plain Python).

A small declarative checker instead of a dependency: `SCHEMA` says, per key, the type a value must
have; `validate_manifest` walks the data and raises one UserError naming the first bad key by its
dotted path (`components.decoder.spec.inputs[2].dtype: expected one of ...`). Keys not in the
schema are allowed (newer writers may add some); a missing required key is an error. The schema
version is compared as an integer before anything else. After the types, the cross references:
every path is a normalized relative path, and every file the runtime opens (component graphs,
their external-data files, the tokenizer, the chat template) is in the hashed `files` list.
"""
from __future__ import annotations

import re
from typing import Any

from ..artifact.paths import check_relpath
from ..errors import UserError
from ..spec import DTYPES, ComponentSpec

SCHEMA_VERSION = 1


class _T:
    """A type check: `check(value, where)` returns an error text or None."""

    def check(self, v: Any, where: str) -> str | None:
        raise NotImplementedError


class Of(_T):
    def __init__(self, *types: type, what: str, test=lambda v: True):
        self.types, self.what, self.test = types, what, test

    def check(self, v, where):
        if isinstance(v, bool) and bool not in self.types:  # JSON true is not an integer here
            return f"expected {self.what}"
        return None if isinstance(v, self.types) and self.test(v) else f"expected {self.what}"


class OneOf(_T):
    def __init__(self, *values: Any):
        self.values = values

    def check(self, v, where):
        return None if isinstance(v, str) and v in self.values else f"expected one of {', '.join(map(str, self.values))}"


class Optional(_T):
    def __init__(self, inner: Any):
        self.inner = inner

    def check(self, v, where):
        return None if v is None else _check(v, self.inner, where)


class ListOf(_T):
    def __init__(self, item: Any):
        self.item = item

    def check(self, v, where):
        if not isinstance(v, list):
            return "expected a list"
        for i, x in enumerate(v):
            _check(x, self.item, f"{where}[{i}]")
        return None


class MapOf(_T):
    def __init__(self, value: Any, key: _T | None = None):
        self.value, self.key = value, key

    def check(self, v, where):
        if not isinstance(v, dict):
            return "expected an object"
        for k, x in v.items():
            if self.key is not None:
                self.key.check(k, f"{where} entry")  # raises its own line
            _check(x, self.value, f"{where}.{k}")
        return None


class Maybe:
    """A key that may be absent."""

    def __init__(self, inner: Any):
        self.inner = inner


class RelPath(_T):
    def check(self, v, where):
        check_relpath(v, where)
        return None


INT = Of(int, what="an integer")
NONNEG = Of(int, what="an integer >= 0", test=lambda v: v >= 0)
POSITIVE = Of(int, what="an integer >= 1", test=lambda v: v >= 1)
STR = Of(str, what="a string")
NAME = Of(str, what="a non-empty name", test=lambda v: bool(v))
OBJ = Of(dict, what="an object")
SHA256 = Of(str, what="a sha256 (64 hex digits)", test=lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None)
REL = RelPath()

DIM = {"min": NONNEG, "opt": NONNEG, "max": NONNEG, "multiple": Maybe(POSITIVE), "derived": Maybe(ListOf(NAME))}
TENSOR = {"name": NAME, "dtype": OneOf(*DTYPES), "shape": ListOf(Of(int, str, what="an integer or a dim name")), "doc": Maybe(STR)}
SPEC = {
    "name": NAME,
    "inputs": ListOf(TENSOR),
    "outputs": ListOf(TENSOR),
    "dims": MapOf(DIM),
    "profiles": Maybe(MapOf(MapOf(DIM))),
    "doc": Maybe(STR),
}
SCHEMA = {
    "schema_version": INT,
    "family": NAME,
    "precision": NAME,
    "opset": POSITIVE,
    "recipe": {"name": NAME},
    "source": OBJ,
    "quantization": Maybe(Optional({"scheme": NAME, "components": OBJ})),
    "limits": {"max_images": NONNEG, "max_context": POSITIVE, "max_new_tokens": POSITIVE},
    # "prefill": a second graph of the same declaration, for prompts (build --prefill-quant-method)
    "components": MapOf({"file": REL, "data_files": ListOf(REL), "sha256": SHA256, "spec": SPEC,
                         "prefill": Maybe({"file": REL, "data_files": ListOf(REL), "sha256": SHA256})}),
    "tokenizer": {
        "file": REL,
        "chat_template": Maybe(Optional(REL)),
        "special_tokens": Maybe(MapOf(STR)),
        "eos_token_ids": ListOf(NONNEG),
    },
    "model": OBJ,
    "versions": OBJ,
    "files": MapOf(SHA256, key=REL),
}


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check(v: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(v, dict):
            raise UserError(f"{where}: expected an object, got {_short(v)}")
        for key, sub in schema.items():
            path = f"{where}.{key}" if where else key
            if key not in v:
                if isinstance(sub, Maybe):
                    continue
                raise UserError(f"{path}: missing")
            _check(v[key], sub.inner if isinstance(sub, Maybe) else sub, path)
        return
    err = schema.check(v, where)
    if err:
        raise UserError(f"{where}: {err}, got {_short(v)}")


def validate_manifest(data: Any) -> None:
    """UserError (one line, naming the key) unless `data` is a manifest this mmexport can run."""
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object, got {type(data).__name__}")
    v = data.get("schema_version")
    if type(v) is not int:
        raise UserError(f"schema_version: expected an integer, got {_short(v)}")
    if v != SCHEMA_VERSION:
        raise UserError(f"schema version {v}, this mmexport reads {SCHEMA_VERSION}; rebuild the artifacts")
    _check(data, SCHEMA, "")
    files = data["files"]
    if not files:
        raise UserError("files: empty; a manifest must list (and hash) every file of the artifact")
    for name, c in data["components"].items():
        where = f"components.{name}"
        if c["spec"]["name"] != name:
            raise UserError(f"{where}.spec.name: {c['spec']['name']!r} declared under {name!r}")
        try:
            ComponentSpec.from_dict(c["spec"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}.spec: {e}") from None
        for w, g in [(where, c)] + ([(f"{where}.prefill", c["prefill"])] if "prefill" in c else []):
            for key, rel in [("file", g["file"])] + [(f"data_files[{i}]", r) for i, r in enumerate(g["data_files"])]:
                if rel not in files:
                    raise UserError(f"{w}.{key}: {rel} is not in the hashed file list (files)")
            if files[g["file"]] != g["sha256"]:
                raise UserError(f"{w}.sha256: differs from the sha256 of {g['file']} in files")
    tok = data["tokenizer"]
    for key in ("file", "chat_template"):
        rel = tok.get(key)
        if rel is not None and rel not in files:
            raise UserError(f"tokenizer.{key}: {rel} is not in the hashed file list (files)")
