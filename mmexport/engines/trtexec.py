"""The `trtexec` command line that builds the same engine as `build_engine` (NVIDIA TensorRT).

Shapes are `name:1x3x224x224`, inputs separated by commas. One profile uses plain
--minShapes/--optShapes/--maxShapes. Several profiles use trtexec's `--profile=N` followed directly by that
profile's three shape flags (`--profile=0 --minShapes=.. --optShapes=.. --maxShapes=.. --profile=1 ..`);
trtexec refuses repeated shape flags without `--profile`.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from mmexport.spec import ComponentSpec


def _name(name: str) -> str:
    # trtexec splits specs on ',' and the last ':'; names holding either are wrapped in single quotes.
    return f"'{name}'" if (":" in name or "," in name) else name


def _shape(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) if dims else "scalar"


def trtexec_shape_flags(spec: ComponentSpec) -> list[str]:
    """The shape flags for every input with a dynamic dim, one group per profile of `spec`."""
    dynamic = [t for t in spec.inputs if t.dim_names()]
    if not dynamic:
        return []
    profiles = spec.profile_dims()
    flags: list[str] = []
    for index, dims in enumerate(profiles.values()):
        if len(profiles) > 1:
            flags.append(f"--profile={index}")
        for which, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
            spec_s = ",".join(f"{_name(t.name)}:{_shape(spec.shape_for(t, dims, which))}" for t in dynamic)
            flags.append(f"{flag}={spec_s}")
    return flags


def trtexec_args(
    onnx_path: Path,
    spec: ComponentSpec,
    engine_path: Path,
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    *,
    trtexec: str = "trtexec",
    skip_inference: bool = True,
) -> list[str]:
    """The trtexec argv (unquoted)."""
    args = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    args += trtexec_shape_flags(spec)
    if workspace_mb is not None:
        args.append(f"--memPoolSize=workspace:{int(workspace_mb)}M")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if skip_inference:
        args.append("--skipInference")
    return args


def trtexec_command(
    onnx_path: Path,
    spec: ComponentSpec,
    engine_path: Path,
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    *,
    trtexec: str = "trtexec",
    skip_inference: bool = True,
) -> str:
    """A shell-quoted trtexec command line building `spec`'s engine from `onnx_path` into `engine_path`.

    --stronglyTyped (precision comes from the ONNX graph), the spec's profiles as min/opt/max shapes,
    --memPoolSize=workspace:<N>M, --timingCacheFile, and --skipInference (build only, no benchmark run).
    """
    return " ".join(
        shlex.quote(a)
        for a in trtexec_args(
            onnx_path,
            spec,
            engine_path,
            workspace_mb,
            timing_cache,
            trtexec=trtexec,
            skip_inference=skip_inference,
        )
    )
