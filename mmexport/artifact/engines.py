"""Engine directories, their `engines.json`, and the check that an engine still fits.

Plain Python (no TensorRT, no numpy, no torch): the runtime imports this to decide whether the engines in
an export directory can be used on this machine.

Layout: ``DIR/engines/<flavor>-<version>[-sm<cc>]/<component>.engine`` plus ``engines.json`` in the same
folder. The ``-sm<cc>`` suffix is there when the engine is tied to one compute capability (NVIDIA
TensorRT always; TensorRT-RTX only when built for one explicit target). A TensorRT-RTX engine built with
the default targets is portable across Ampere and later GPUs and has no suffix.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Union

from mmexport.artifact.files import sha256_file
from mmexport.errors import UserError

METADATA_FILE = "engines.json"
ENGINES_SUBDIR = "engines"
METADATA_FORMAT = 1

# TensorRT-RTX engines built without explicit targets run on compute capability 8.0 and later
# ("8.0, 8.6, 8.9, 12.0 and later" in its CPU-only AOT documentation); Turing (7.5) needs an explicit target.
RTX_DEFAULT_MIN_CC = (8, 0)

CCLike = Union[str, int, tuple, None]


# --------------------------------------------------------------------------------------------------
# Compute capability
# --------------------------------------------------------------------------------------------------


def normalize_cc(value: CCLike) -> str | None:
    """Canonical "major.minor" for a compute capability given as "8.7", "87", "sm87", "sm_87", 87, (8, 7)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"compute capability {value!r}: need (major, minor)")
        return f"{int(value[0])}.{int(value[1])}"
    if isinstance(value, int):
        return f"{value // 10}.{value % 10}"
    s = str(value).strip().lower()
    for prefix in ("sm_", "sm", "compute_"):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    if "." in s:
        major, _, minor = s.partition(".")
        if major.isdigit() and minor.isdigit():
            return f"{int(major)}.{int(minor)}"
    elif s.isdigit() and len(s) >= 2:
        return f"{int(s[:-1])}.{int(s[-1])}"
    raise ValueError(f"not a compute capability: {value!r} (use e.g. 8.6, 86 or sm86)")


def cc_tuple(value: CCLike) -> tuple[int, int] | None:
    cc = normalize_cc(value)
    if cc is None:
        return None
    major, _, minor = cc.partition(".")
    return int(major), int(minor)


def cc_tag(value: CCLike) -> str:
    """"8.7" -> "sm87", "12.0" -> "sm120"."""
    cc = normalize_cc(value)
    if cc is None:
        raise ValueError("no compute capability")
    return "sm" + cc.replace(".", "")


def current_compute_capability(device: int = 0) -> str | None:
    """Compute capability of CUDA device `device` ("8.7"), or None when there is no usable GPU.

    Asks the CUDA driver API through ctypes (libcuda), so it needs neither torch nor cuda-python and works
    on Jetson (L4T ships libcuda.so.1) as on servers. Honours CUDA_VISIBLE_DEVICES like any CUDA program.
    """
    names = ("nvcuda.dll",) if sys.platform.startswith("win") else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), int(device)) != 0:
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, ..._MINOR = 76
        if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0:
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0:
            return None
    except (AttributeError, OSError):
        return None
    return f"{major.value}.{minor.value}"


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


ONNX_IDENTITY_TAG = "mmexport-onnx-identity/1"


def combine_onnx_identity(onnx_sha256: str, data_sha256: Mapping[str, str]) -> str:
    """The identity of an ONNX model from the sha256 of its .onnx file and of its external data files.

    `data_sha256`: {location relative to the .onnx file's folder (as the ONNX `location` field writes it):
    sha256}. A model without external data is identified by the .onnx file's own sha256, so plain models
    and older metadata keep their identity; with external data the identity is the sha256 of a small text
    naming every file and its sha256, so new weights in `model.onnx.data` under an unchanged graph count
    as a different model.
    """
    if not data_sha256:
        return str(onnx_sha256).lower()
    lines = [ONNX_IDENTITY_TAG, f"{str(onnx_sha256).lower()}  (onnx)"]
    lines += [f"{str(sha).lower()}  {Path(loc).as_posix()}" for loc, sha in sorted(data_sha256.items())]
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def external_data_files(onnx_path: "str | os.PathLike[str]") -> list[str]:
    """Locations (relative to the .onnx file's folder) of the external data files the model references.

    Reads the graph with `onnx` when it is installed (tensors are not loaded); without `onnx`, or for a
    file `onnx` cannot read, falls back to the `<name>.onnx.data` file beside it when there is one.
    """
    onnx_path = Path(onnx_path)
    try:
        import onnx  # noqa: PLC0415 (optional; only the export side has it)
    except ImportError:
        onnx = None  # type: ignore[assignment]
    if onnx is not None:
        try:
            model = onnx.load(str(onnx_path), load_external_data=False)
        except Exception:
            model = None
        if model is not None:
            locations: set[str] = set()

            def tensor(t: Any) -> None:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    for kv in t.external_data:
                        if kv.key == "location":
                            locations.add(kv.value)

            def nodes(ns: Iterable[Any]) -> None:
                for n in ns:
                    for a in n.attribute:
                        if a.HasField("t"):
                            tensor(a.t)
                        for t in a.tensors:
                            tensor(t)
                        if a.HasField("g"):
                            graph(a.g)
                        for g in a.graphs:
                            graph(g)

            def graph(g: Any) -> None:
                for t in g.initializer:
                    tensor(t)
                nodes(g.node)

            graph(model.graph)
            for f in model.functions:
                nodes(f.node)
            return sorted(locations)
    sibling = onnx_path.with_name(onnx_path.name + ".data")
    return [sibling.name] if sibling.is_file() else []


def onnx_identity_sha256(
    onnx_path: "str | os.PathLike[str]", data_files: "Iterable[str] | None" = None
) -> str:
    """sha256 identity of an ONNX model covering the .onnx file and its external data (see
    `combine_onnx_identity`). `data_files`: locations relative to the .onnx file's folder; None finds them
    with `external_data_files`. A listed file that does not exist is left out (the parser reports it)."""
    onnx_path = Path(onnx_path)
    locations = external_data_files(onnx_path) if data_files is None else list(data_files)
    data = {}
    for loc in locations:
        p = onnx_path.parent / loc
        if p.is_file():
            data[Path(loc).as_posix()] = sha256_file(p)
    return combine_onnx_identity(sha256_file(onnx_path), data)


def write_bytes_atomic(path: Path, data: Any) -> None:
    """Write `data` (bytes or any buffer, e.g. TensorRT's IHostMemory) to `path` via a temporary file."""
    from mmexport.artifact.files import atomic_write  # exclusive temporary file + rename: never through a symlink

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, memoryview(data) if not isinstance(data, (bytes, bytearray, memoryview, str)) else data)


# --------------------------------------------------------------------------------------------------
# Engine directories
# --------------------------------------------------------------------------------------------------


def engine_dir_name(
    flavor: str, version: str, compute_capability: CCLike = None, compute_targets: Iterable[str] = ()
) -> str:
    """"tensorrt-10.3.0-sm87", "tensorrt-rtx-1.7.1.116" (portable) or "tensorrt-rtx-1.7.1.116-sm86"."""
    name = f"{flavor}-{version}"
    if compute_capability is not None:
        return f"{name}-{cc_tag(compute_capability)}"
    tags = [cc_tag(t) for t in compute_targets]
    if tags:
        return f"{name}-{'+'.join(tags)}"
    return name


def engines_root(export_dir: "str | os.PathLike[str]") -> Path:
    return Path(export_dir) / ENGINES_SUBDIR


def save_metadata(engine_dir: Path, meta: Mapping[str, Any]) -> Path:
    path = Path(engine_dir) / METADATA_FILE
    write_bytes_atomic(path, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())
    return path


def load_metadata(engine_dir: "str | os.PathLike[str]") -> dict[str, Any]:
    """Read `engines.json` from an engine directory (or the path of the file itself)."""
    p = Path(engine_dir)
    path = p if p.name == METADATA_FILE else p / METADATA_FILE
    if not path.is_file():
        raise UserError(f"no engine metadata at {path}; build engines with `mmexport engines {_export_dir_of(path)}`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt engine metadata {path}: {e}") from e
    if not isinstance(meta, dict) or "components" not in meta:
        raise UserError(f"corrupt engine metadata {path}: no 'components'")
    return meta


def list_engine_dirs(export_dir: "str | os.PathLike[str]") -> list[tuple[Path, dict[str, Any]]]:
    """Every engine directory under DIR/engines with its metadata (unreadable ones are skipped)."""
    root = engines_root(export_dir)
    out: list[tuple[Path, dict[str, Any]]] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if (d / METADATA_FILE).is_file():
            try:
                out.append((d, load_metadata(d)))
            except UserError:
                continue
    return out


def find_engine_dir(
    export_dir: "str | os.PathLike[str]", flavor: str, version: str, current_cc: CCLike = None
) -> Path | None:
    """The engine directory under DIR/engines built by `flavor` `version` that can run on `current_cc`."""
    cc = normalize_cc(current_cc)
    candidates = []
    if cc is not None:
        candidates.append(engine_dir_name(flavor, version, cc))
    candidates.append(engine_dir_name(flavor, version))
    root = engines_root(export_dir)
    for name in candidates:
        if (root / name / METADATA_FILE).is_file():
            return root / name
    # Multi-target RTX builds ("-sm86+sm120") and anything else: ask each directory's metadata.
    for d, meta in list_engine_dirs(export_dir):
        if meta.get("flavor") == flavor and str(meta.get("version")) == str(version):
            if cc is None or _cc_fits(meta, cc) is None:
                return d
    return None


def _export_dir_of(path: Path) -> str:
    # DIR/engines/<name>/engines.json -> DIR
    parts = Path(path).resolve().parents
    return str(parts[2]) if len(parts) > 2 else "DIR"


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


def _flavor_version(current: Any) -> tuple[str, str]:
    if current is None:
        raise ValueError("current_flavor_version is required")
    if hasattr(current, "name") and hasattr(current, "version"):  # a Flavor
        return str(current.name), str(current.version)
    if isinstance(current, Mapping):
        return str(current["flavor"]), str(current["version"])
    if isinstance(current, (tuple, list)) and len(current) == 2:
        return str(current[0]), str(current[1])
    if isinstance(current, str):
        s = current.strip()
        if " " in s:
            f, _, v = s.partition(" ")
            return f.strip(), v.strip()
        f, _, v = s.rpartition("-")
        if f and v:
            return f, v
    raise ValueError(f"current_flavor_version: expected a Flavor, (flavor, version) or 'flavor version', got {current!r}")


def _targets_text(meta: Mapping[str, Any]) -> str:
    cc = meta.get("compute_capability")
    if cc:
        return cc_tag(cc)
    targets = meta.get("compute_targets") or []
    if targets:
        return "+".join(cc_tag(t) for t in targets)
    if meta.get("flavor") == "tensorrt-rtx":
        return "sm80 and later (TensorRT-RTX default targets)"
    return "an unknown GPU"


def _cc_fits(meta: Mapping[str, Any], cc: str) -> str | None:
    """None when an engine with `meta` can run on compute capability `cc`, else the target description."""
    built_cc = normalize_cc(meta.get("compute_capability"))
    targets = [normalize_cc(t) for t in (meta.get("compute_targets") or [])]
    if built_cc is not None:
        return None if built_cc == cc else _targets_text(meta)
    if targets:
        return None if cc in targets else _targets_text(meta)
    if meta.get("flavor") == "tensorrt-rtx":
        t = cc_tuple(cc)
        return None if t is not None and t >= RTX_DEFAULT_MIN_CC else _targets_text(meta)
    return None  # built where the compute capability could not be read: nothing to compare


def check_engine_metadata(
    meta: Mapping[str, Any],
    onnx_sha256_by_component: Mapping[str, str],
    current_flavor_version: Any,
    current_cc: CCLike,
    export_dir: "str | os.PathLike[str] | None" = None,
) -> None:
    """Raise UserError (one line, saying to rebuild) when an engine does not fit this ONNX and this machine.

    `meta`: the `engines.json` dict (or one component's dict as `build_engine` returns it).
    `onnx_sha256_by_component`: {component: sha256 of its ONNX file now}; every listed component is checked.
    `current_flavor_version`: the installed flavour: a `Flavor`, ("tensorrt-rtx", "1.7.1.116") or
    "tensorrt-rtx 1.7.1.116". `current_cc`: this GPU's compute capability ("8.7", 87, (8, 7)); None skips
    the compute-capability check (no GPU known).
    """
    rebuild = f"rebuild with `mmexport engines {export_dir if export_dir is not None else 'DIR'}`"
    cur_flavor, cur_version = _flavor_version(current_flavor_version)
    cc = normalize_cc(current_cc)

    if "components" in meta:
        components: Mapping[str, Any] = meta["components"]
        defaults = {k: v for k, v in meta.items() if k != "components"}
    else:
        components = {str(meta.get("component", "?")): meta}
        defaults = {}

    for name, want_sha in onnx_sha256_by_component.items():
        comp = components.get(name)
        if comp is None:
            built_by = f"{defaults.get('flavor', '?')} {defaults.get('version', '?')}"
            raise UserError(f"no engine for component {name} in the engines built by {built_by}; {rebuild}")
        m = {**defaults, **comp}
        flavor, version = str(m.get("flavor")), str(m.get("version"))
        by = f"{flavor} {version}"
        if flavor != cur_flavor or version != cur_version:
            raise UserError(
                f"engine {name} was built by {by} but {cur_flavor} {cur_version} is installed; {rebuild}"
            )
        if cc is not None:
            targets = _cc_fits(m, cc)
            if targets is not None:
                raise UserError(
                    f"engine {name} was built by {by} for {targets} but this GPU is {cc_tag(cc)}; {rebuild}"
                )
        built_sha = m.get("onnx_sha256")
        if not built_sha or str(built_sha).lower() != str(want_sha).lower():
            raise UserError(
                f"engine {name} was built by {by} from a different ONNX "
                f"(sha256 {str(built_sha)[:12]}, the ONNX now has {str(want_sha)[:12]}); {rebuild}"
            )


def manifest_onnx_identities(manifest: Any) -> dict[str, str]:
    """{component: ONNX identity} from the manifest's sha256 of each .onnx file and of its data files.

    Equal to `onnx_identity_sha256(component file)` for an intact artifact, without hashing the weights
    again (`load_manifest` has checked every listed file's sha256 already).
    """
    files: Mapping[str, str] = manifest.data.get("files", {})
    out: dict[str, str] = {}
    for name, comp in manifest.data["components"].items():
        onnx_rel = PurePosixPath(comp["file"])
        data: dict[str, str] = {}
        for rel in comp.get("data_files", []) or []:
            rel_p = PurePosixPath(rel)
            try:
                loc = rel_p.relative_to(onnx_rel.parent).as_posix()
            except ValueError:
                loc = rel_p.as_posix()
            sha = files.get(rel)
            if sha is None:
                path = manifest.root / rel
                if not path.is_file():
                    raise UserError(f"{manifest.root}: missing file {rel} (data of component {name}); rebuild or copy it again")
                sha = sha256_file(path)
            data[loc] = sha
        out[name] = combine_onnx_identity(comp["sha256"], data)
    return out
