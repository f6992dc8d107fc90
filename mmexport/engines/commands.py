"""Engines for a whole artifact directory: what `mmexport engines DIR` does.

- `build_engines`: one engine per component of DIR/manifest.json, built with the Python API
  (TensorRT-RTX builds without a GPU; NVIDIA TensorRT builds on the target).
- `trtexec_lines`: the same builds as shell lines for NVIDIA's `trtexec` on the target (a Jetson), run
  from DIR, followed by the line that records the engines (`adopt_engines`) so the `trt` backend
  accepts them.
- `adopt_engines`: move engines built outside mmexport into ``DIR/engines/<flavor>-<version>[-sm<cc>]/``
  and write their ``engines.json``.

A component's ONNX identity (recorded as `onnx_sha256` and checked by the runtime) is taken from the
manifest: the sha256 of the .onnx file combined with those of its external data files, since the weights
live in the .data file.

Run as a module for the adopt step: ``python3 -m mmexport.engines.commands adopt DIR SRC [--flavor F]``.
"""
from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

from mmexport.engines.builder import _profile_shapes, write_engine_dir
from mmexport.runtime.flavors import TENSORRT, Flavor, resolve_flavor
from mmexport.artifact.files import sha256_file
from mmexport.artifact.engines import (
    manifest_onnx_identities,
    ENGINES_SUBDIR,
    METADATA_FILE,
    METADATA_FORMAT,
    CCLike,
    combine_onnx_identity,
    current_compute_capability,
    engine_dir_name,
    engines_root,
    normalize_cc,
    save_metadata,
)
from mmexport.engines.trtexec import trtexec_args
from mmexport.errors import UserError

__all__ = [
    "TRTEXEC_STAGING",
    "adopt_engines",
    "build_engines",
    "manifest_onnx_identities",
    "trtexec_lines",
]

Log = Callable[[str], None]

# Where `trtexec_lines` writes engines before `adopt_engines` files them under their real name.
TRTEXEC_STAGING = "trtexec"


def _load(artifact_dir: "str | Path", check_files: bool = True) -> Any:
    from mmexport.runtime.manifest import load_manifest  # plain Python (json, hashlib)

    return load_manifest(Path(artifact_dir), check_files=check_files)


def build_engines(
    artifact_dir: "str | Path",
    flavor: "str | Flavor" = "auto",
    workspace_mb: int | None = None,
    timing_cache: "str | Path | None" = None,
    compute_capabilities: Sequence[CCLike] | None = None,
    force: bool = False,
    log: Log | None = print,
) -> tuple[Path, dict[str, Any]]:
    """Build one engine per component of ``DIR/manifest.json`` into ``DIR/engines/<flavor>-<version>[-sm<cc>]/``.

    The manifest is loaded with its file checks (a modified or half-copied artifact is refused), the
    profiles come from each component's spec, the ONNX identity from the manifest. Engines already built
    for the same identity and profiles are kept unless `force`. Returns (engine directory, the metadata
    written to its engines.json). Raises UserError (with every parser/builder message) on failure.
    """
    artifact_dir = Path(artifact_dir)
    manifest = _load(artifact_dir)
    specs = manifest.components
    if not specs:
        raise UserError(f"{artifact_dir}: the manifest lists no components")
    if manifest.data.get("quantization"):
        q = manifest.data["quantization"]
        ops = "dynamic quantization (MatMulInteger)" if q.get("method") == "dynamic" else "ONNX Runtime's MatMulNBits"
        raise UserError(f"{artifact_dir}: a {q['scheme']} build uses {ops}, which TensorRT does not build; "
                        "build engines from an unquantized build")
    identities = manifest_onnx_identities(manifest)
    comps = [(spec, manifest.component_file(name)) for name, spec in specs.items()]
    return write_engine_dir(
        artifact_dir,
        comps,
        flavor,
        workspace_mb=workspace_mb,
        timing_cache=Path(timing_cache) if timing_cache is not None else None,
        log=log,
        compute_capabilities=compute_capabilities,
        force=force,
        onnx_sha256s=identities,
    )


def trtexec_lines(
    artifact_dir: "str | Path",
    flavor_name_for_path: str = TENSORRT,
    workspace_mb: int | None = None,
    timing_cache: "str | Path | None" = None,
) -> list[str]:
    """Shell lines that build every component's engine with NVIDIA `trtexec`, run from the artifact directory.

    Paths are relative to DIR so the lines work after copying DIR to the target (a Jetson): the engines
    go to ``engines/trtexec/`` and the last line records them (flavour, version, GPU, ONNX identity)
    under ``engines/<flavor>-<version>-sm<cc>/`` with `adopt_engines`, which the `trt` backend needs.
    `trtexec` is taken from $TRTEXEC, else PATH, else JetPack's /usr/src/tensorrt/bin/trtexec.
    Lines starting with '#' are comments.
    """
    manifest = _load(artifact_dir, check_files=False)
    staging = f"{ENGINES_SUBDIR}/{TRTEXEC_STAGING}"
    lines = [
        f"# run from the artifact directory: cd {shlex.quote(str(artifact_dir))}",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        f"mkdir -p {staging}",
    ]
    for name, spec in manifest.components.items():
        rel_onnx = Path(manifest.data["components"][name]["file"])
        args = trtexec_args(
            rel_onnx,
            spec,
            Path(staging) / f"{name}.engine",
            workspace_mb,
            Path(timing_cache) if timing_cache is not None else None,
        )
        lines.append('"$TRTEXEC" ' + " ".join(shlex.quote(a) for a in args[1:]))
    lines.append("# record the engines (flavour, version, GPU, ONNX sha256) so `--backend trt` accepts them:")
    lines.append(f"python3 -m mmexport.engines.commands adopt . {staging} --flavor {shlex.quote(flavor_name_for_path)}")
    return lines


def adopt_engines(
    artifact_dir: "str | Path",
    source_dir: "str | Path",
    flavor: "str | Flavor" = TENSORRT,
    compute_capability: CCLike = None,
    log: Log | None = print,
    *,
    built_by: str = "trtexec",
    workspace_mb: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Record engines built outside mmexport (``<component>.engine`` in `source_dir`, e.g. by trtexec from
    `trtexec_lines`): move them to ``DIR/engines/<flavor>-<version>[-sm<cc>]/`` and write engines.json.

    The flavour must be the one installed here (its version is recorded); `compute_capability` defaults to
    this GPU's. The engines are taken on trust to match the manifest's specs and profile order (trtexec's
    --profile=N order is the spec's); their sha256 and the ONNX identities are recorded.
    """
    log = log or (lambda _m: None)
    artifact_dir, source_dir = Path(artifact_dir), Path(source_dir)
    if not source_dir.is_dir() and not source_dir.is_absolute() and (artifact_dir / source_dir).is_dir():
        source_dir = artifact_dir / source_dir  # relative to DIR rather than to the working directory
    manifest = _load(artifact_dir)
    fl = resolve_flavor(flavor)
    cc = compute_capability or current_compute_capability()
    if cc is None:
        log("warning: could not read this GPU's compute capability; the engine metadata will not record it")
    cc = normalize_cc(cc)
    missing = [n for n in manifest.components if not (source_dir / f"{n}.engine").is_file()]
    if missing:
        raise UserError(f"{source_dir}: no engine for component(s) {', '.join(missing)} (expected <component>.engine)")
    engine_dir = engines_root(artifact_dir) / engine_dir_name(fl.name, fl.version, cc)
    if engine_dir.resolve() == source_dir.resolve():
        raise UserError(f"{source_dir} is already the engine directory; nothing to adopt")
    engine_dir.mkdir(parents=True, exist_ok=True)
    identities = manifest_onnx_identities(manifest)
    comps: dict[str, dict[str, Any]] = {}
    for name, spec in manifest.components.items():
        dest = engine_dir / f"{name}.engine"
        shutil.move(str(source_dir / f"{name}.engine"), str(dest))
        profile_dims = spec.profile_dims()
        dynamic = [t for t in spec.inputs if t.dim_names()]
        input_shapes = (
            {p: {t.name: _profile_shapes(spec, t, dims) for t in dynamic} for p, dims in profile_dims.items()}
            if dynamic
            else {}
        )
        comp_file = manifest.data["components"][name]
        comps[name] = {
            "compute_capability": cc,
            "compute_targets": [cc] if cc else [],
            "onnx": Path(comp_file["file"]).name,
            "onnx_sha256": identities[name],
            "onnx_data": [Path(r).name for r in comp_file.get("data_files", []) or []],
            "engine": dest.name,
            "engine_bytes": dest.stat().st_size,
            "engine_sha256": sha256_file(dest),
            "profiles": {p: {n: d.to_dict() for n, d in dims.items()} for p, dims in profile_dims.items()},
            "profile_names": list(input_shapes),
            "input_shapes": input_shapes,
            "workspace_mb": workspace_mb,
            "built_by": built_by,
        }
        log(f"{name}: adopted {dest}")
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "flavor": fl.name,
        "version": fl.version,
        "compute_capability": cc,
        "compute_targets": [cc] if cc else [],
        "built_by": built_by,
        "components": comps,
    }
    save_metadata(engine_dir, meta)
    try:
        source_dir.rmdir()  # only when empty
    except OSError:
        pass
    log(f"engines for {len(comps)} component(s) recorded in {engine_dir / METADATA_FILE}")
    return engine_dir, meta


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmexport.engines.commands adopt DIR SRC [--flavor F] [--cc 8.7]`` (what trtexec_lines prints)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmexport.engines.commands")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("adopt", help="record engines built by trtexec so the trt backend accepts them")
    a.add_argument("artifact_dir")
    a.add_argument("source_dir")
    a.add_argument("--flavor", default=TENSORRT)
    a.add_argument("--cc", default=None, help="compute capability (default: this GPU's)")
    args = ap.parse_args(argv)
    try:
        adopt_engines(args.artifact_dir, args.source_dir, args.flavor, args.cc, log=lambda m: print(m, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
