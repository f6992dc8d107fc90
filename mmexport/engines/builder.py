"""Build TensorRT / TensorRT-RTX engines from exported ONNX files.

One code path for both flavours (they share the Python API): a strongly typed network (precision is
decided in the ONNX graph, no builder precision flags), `OnnxParser.parse_from_file` (so external data
next to the ONNX file resolves), one optimization profile per entry of `ComponentSpec.profile_dims()`,
a workspace limit, the timing cache where the flavour has one, `build_serialized_network`.

TensorRT itself is only imported through `flavors.resolve_flavor`, when a build is asked for.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mmexport.runtime.flavors import Flavor, resolve_flavor
from mmexport.artifact.files import sha256_file
from mmexport.artifact.engines import (
    METADATA_FORMAT,
    CCLike,
    check_engine_metadata,
    current_compute_capability,
    engine_dir_name,
    engines_root,
    external_data_files,
    find_engine_dir,
    list_engine_dirs,
    load_metadata,
    normalize_cc,
    onnx_identity_sha256,
    save_metadata,
    write_bytes_atomic,
)
from mmexport.errors import UserError
from mmexport.spec import ComponentSpec, TensorSpec

__all__ = [
    "EngineBuildError",
    "OnnxParseError",
    "build_engine",
    "write_engine_dir",
    "load_metadata",
    "check_engine_metadata",
    "find_engine_dir",
    "list_engine_dirs",
    "engine_dir_name",
]

Log = Callable[[str], None]

# TensorRT DataType.name -> spec dtype
_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
}


class EngineBuildError(UserError):
    """The engine could not be built; `errors` holds every message TensorRT gave."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        self.errors = list(errors)
        if self.errors:
            message = message + "\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(message)


class OnnxParseError(EngineBuildError):
    """The ONNX parser rejected the graph; `errors` lists each parser error (node, operator, description)."""


def _noop(_msg: str) -> None:
    pass


def _make_logger(trt: Any, log: Log, verbose: bool) -> Any:
    """An ILogger that forwards TensorRT's warnings/errors to `log` and keeps the errors for reports."""
    sev = trt.ILogger.Severity
    error_levels = {sev.INTERNAL_ERROR, sev.ERROR}

    class _Logger(trt.ILogger):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # noqa: A003 (TensorRT's name)
            if severity in error_levels:
                self.errors.append(msg)
                log(f"[TRT] ERROR: {msg}")
            elif severity == sev.WARNING:
                log(f"[TRT] WARNING: {msg}")
            elif verbose:
                log(f"[TRT] {msg}")

    return _Logger()


def _parser_error_text(err: Any) -> str:
    """One line for an IParserError: node index/name/operator, error code, description."""

    def get(attr: str, default: Any = None) -> Any:
        fn = getattr(err, attr, None)
        if fn is None:
            return default
        try:
            return fn()
        except Exception:
            return default

    where = []
    node = get("node", -1)
    if node is not None and node >= 0:
        where.append(f"node {node}")
    name = get("node_name", "")
    if name:
        where.append(repr(name))
    op = get("node_operator", "")
    if op:
        where.append(f"op {op}")
    code = get("code")
    code_s = getattr(code, "name", None) or (str(code).split(".")[-1] if code is not None else "ERROR")
    desc = str(get("desc", "") or "").strip()
    prefix = f"{' '.join(where)}: " if where else ""
    return f"{prefix}{code_s}: {desc}"


def _resolve_rtx_targets(trt: Any, compute_capabilities: Sequence[CCLike]) -> tuple[list[Any], list[str]]:
    """Map "8.6"/"sm86"/"current" to trt.ComputeCapability members and to recorded "major.minor" strings."""
    enum = trt.ComputeCapability
    members, recorded = [], []
    for cc in compute_capabilities:
        if isinstance(cc, str) and cc.strip().lower() == "current":
            if len(compute_capabilities) != 1:
                raise UserError("compute capability 'current' cannot be combined with other targets")
            members.append(enum.CURRENT)
            here = current_compute_capability()
            if here is not None:
                recorded.append(here)
            continue
        norm = normalize_cc(cc)
        assert norm is not None
        member = getattr(enum, "SM" + norm.replace(".", ""), None)
        if member is None:
            known = [n for n in enum.__members__ if n.startswith("SM")]
            raise UserError(
                f"TensorRT-RTX cannot target compute capability {norm}; it knows {', '.join(known)}"
            )
        members.append(member)
        recorded.append(norm)
    return members, recorded


def _check_io(network: Any, spec: ComponentSpec, onnx_path: Path) -> dict[str, Any]:
    """Compare the parsed network's I/O with the spec; return {input name: ITensor}."""
    problems: list[str] = []
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    for kind, have, want in (("inputs", inputs, spec.input_names), ("outputs", outputs, spec.output_names)):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            problems.append(f"{kind}: the spec declares {want}, the ONNX graph has {list(have)}")
    for tensors, specs in ((inputs, spec.inputs), (outputs, spec.outputs)):
        for ts in specs:
            t = tensors.get(ts.name)
            if t is None:
                continue
            dt = _DTYPE_NAMES.get(getattr(t.dtype, "name", ""), str(t.dtype))
            if dt != ts.dtype:
                problems.append(f"{ts.name}: dtype {dt} in the ONNX graph, {ts.dtype} in the spec")
            shape = tuple(t.shape)
            if len(shape) != len(ts.shape):
                problems.append(f"{ts.name}: rank {len(shape)} in the ONNX graph, {len(ts.shape)} in the spec")
    # Fixed axes in the graph must agree with the spec (a dynamic axis in the graph takes any spec value).
    for ts in spec.inputs:
        t = inputs.get(ts.name)
        if t is None or len(tuple(t.shape)) != len(ts.shape):
            continue
        for axis, (got, want) in enumerate(zip(tuple(t.shape), ts.shape)):
            if got < 0:
                continue
            if isinstance(want, int):
                if want != got:
                    problems.append(f"{ts.name}: axis {axis} is {got} in the ONNX graph, {want} in the spec")
            else:
                for prof, dims in spec.profile_dims().items():
                    d = dims[want]
                    if not (d.min == d.opt == d.max == got):
                        problems.append(
                            f"{ts.name}: axis {axis} is fixed to {got} in the ONNX graph but the spec makes it "
                            f"dynamic dim {want!r} ({d.min}..{d.max} in profile {prof})"
                        )
                        break
    if problems:
        raise EngineBuildError(f"{spec.name}: {onnx_path.name} does not match its spec", problems)
    return inputs


def _profile_shapes(spec: ComponentSpec, tensor: TensorSpec, dims: Mapping[str, Any]) -> dict[str, list[int]]:
    return {w: list(spec.shape_for(tensor, dict(dims), w)) for w in ("min", "opt", "max")}


def build_engine(
    onnx_path: Path,
    spec: ComponentSpec,
    out_path: Path,
    flavor: "str | Flavor" = "auto",
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    log: Log | None = None,
    *,
    compute_capabilities: Sequence[CCLike] | None = None,
    verbose: bool = False,
    onnx_sha256: str | None = None,
) -> dict[str, Any]:
    """Build one engine from `onnx_path` into `out_path` and return its metadata.

    `flavor`: "auto" | "tensorrt" | "tensorrt-rtx" or a resolved `Flavor`.
    `workspace_mb`: limit of the builder's workspace memory pool (None: TensorRT's default, the GPU's size).
    `timing_cache`: file loaded before and saved after the build (NVIDIA TensorRT only: TensorRT-RTX's
    timing cache is a no-op, so it is ignored there).
    `compute_capabilities` (TensorRT-RTX only): target GPUs, e.g. ["8.6"], ["8.6", "12.0"] or ["current"];
    None keeps TensorRT-RTX's default (portable across compute capability 8.0 and later, no GPU needed).
    NVIDIA TensorRT always builds for the GPU it runs on.
    `onnx_sha256`: the model's identity when the caller already knows it (e.g. from the manifest); None
    computes `onnx_identity_sha256(onnx_path)`, which covers the external data files too.

    Raises `OnnxParseError` listing every parser error, `EngineBuildError` for a spec mismatch or a failed
    build (with TensorRT's error messages), UserError for a missing flavour or file.

    The returned dict: component, flavor, version, compute_capability ("8.7" or None when the engine is
    not tied to one), compute_targets (list of "major.minor"; [] = TensorRT-RTX default targets), onnx,
    onnx_sha256 (identity of the .onnx file and its external data), onnx_data (external data locations),
    engine, engine_bytes, engine_sha256, profiles ({profile: {dim: {min, opt, max}}}, in
    profile-index order), profile_names, input_shapes ({profile: {input: {min, opt, max}}}),
    workspace_mb, parse_seconds, build_seconds.
    """
    log = log or _noop
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    fl = resolve_flavor(flavor)
    trt = fl.module
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    if workspace_mb is not None and workspace_mb <= 0:
        raise UserError(f"workspace_mb must be positive, got {workspace_mb}")

    # Which GPU(s) the engine is for.
    if fl.is_rtx:
        targets_enum, compute_targets = _resolve_rtx_targets(trt, list(compute_capabilities or []))
        compute_capability = compute_targets[0] if len(compute_targets) == 1 else None
    else:
        if compute_capabilities:
            raise UserError(
                "NVIDIA TensorRT builds for the GPU it runs on and cannot target other compute capabilities; "
                "use the tensorrt-rtx flavour to build for other GPUs"
            )
        targets_enum = []
        compute_capability = current_compute_capability()
        if compute_capability is None:
            log("warning: could not read this GPU's compute capability; the engine metadata will not record it")
        compute_targets = [compute_capability] if compute_capability else []

    t0 = time.perf_counter()
    logger = _make_logger(trt, log, verbose)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # e.g. NVIDIA TensorRT without a usable GPU: "factory function returned nullptr"
        builder = None
        logger.errors.append(f"{type(e).__name__}: {e}")
    if builder is None:
        hint = " (NVIDIA TensorRT needs a GPU to build; the tensorrt-rtx flavour builds without one)" if (
            fl.needs_gpu_to_build
        ) else ""
        raise EngineBuildError(f"{spec.name}: {fl.label} could not create a builder{hint}", logger.errors)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)

    log(f"{spec.name}: parsing {onnx_path} with {fl.label}")
    ok = parser.parse_from_file(str(onnx_path))
    n_err = parser.num_errors
    if not ok or n_err:
        errors = [_parser_error_text(parser.get_error(i)) for i in range(n_err)] or logger.errors
        raise OnnxParseError(
            f"{spec.name}: {fl.label} could not parse {onnx_path} ({len(errors)} error(s))", errors
        )
    parse_seconds = time.perf_counter() - t0
    net_inputs = _check_io(network, spec, onnx_path)

    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if targets_enum:
        config.num_compute_capabilities = len(targets_enum)
        for i, member in enumerate(targets_enum):
            if not config.set_compute_capability(member, i):
                raise EngineBuildError(f"{fl.label}: could not set compute capability {member}", logger.errors)

    # Optimization profiles: one per spec profile, shapes for every input with a dynamic axis.
    profile_dims = spec.profile_dims()
    dynamic_inputs = [
        ts for ts in spec.inputs if ts.dim_names() or any(d < 0 for d in tuple(net_inputs[ts.name].shape))
    ]
    input_shapes: dict[str, dict[str, dict[str, list[int]]]] = {}
    if dynamic_inputs:
        for prof_name, dims in profile_dims.items():
            profile = builder.create_optimization_profile()
            shapes = {}
            for ts in dynamic_inputs:
                s = _profile_shapes(spec, ts, dims)
                profile.set_shape(ts.name, s["min"], s["opt"], s["max"])
                shapes[ts.name] = s
            index = config.add_optimization_profile(profile)
            if index < 0:
                raise EngineBuildError(
                    f"{spec.name}: {fl.label} rejected optimization profile {prof_name!r} {shapes}", logger.errors
                )
            input_shapes[prof_name] = shapes
    elif len(profile_dims) > 1:
        log(f"{spec.name}: no input has a dynamic axis; the {len(profile_dims)} declared profiles are not needed")

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        if fl.supports_timing_cache:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            try:
                cache = config.create_timing_cache(blob)
            except Exception:
                cache = None
            if cache is None and blob:
                log(f"warning: timing cache {timing_cache} is unreadable; starting a new one")
                cache = config.create_timing_cache(b"")
            if cache is not None:
                config.set_timing_cache(cache, False)
        else:
            log(f"{fl.label} has no timing cache (its timing cache calls are no-ops); ignoring {timing_cache}")

    where = "default targets (compute capability 8.0+)" if fl.is_rtx and not targets_enum else (
        "+".join(compute_targets) or "this GPU"
    )
    log(f"{spec.name}: building with {fl.label} for {where}")
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t1
    if serialized is None or serialized.nbytes == 0:
        hint = ""
        if fl.needs_gpu_to_build and compute_capability is None:
            hint = " (NVIDIA TensorRT needs a GPU to build; the tensorrt-rtx flavour builds without one)"
        raise EngineBuildError(f"{spec.name}: {fl.label} failed to build the engine{hint}", logger.errors)

    write_bytes_atomic(out_path, serialized)
    if cache is not None and timing_cache is not None:
        tc = config.get_timing_cache()
        if tc is not None:
            write_bytes_atomic(timing_cache, tc.serialize())

    data_locations = external_data_files(onnx_path)
    meta = {
        "component": spec.name,
        "flavor": fl.name,
        "version": fl.version,
        "compute_capability": compute_capability,
        "compute_targets": compute_targets,
        "onnx": onnx_path.name,
        "onnx_sha256": onnx_sha256 or onnx_identity_sha256(onnx_path, data_locations),
        "onnx_data": data_locations,
        "engine": out_path.name,
        "engine_bytes": out_path.stat().st_size,
        "engine_sha256": sha256_file(out_path),
        "profiles": {p: {n: d.to_dict() for n, d in dims.items()} for p, dims in profile_dims.items()},
        "profile_names": list(input_shapes) if input_shapes else [],
        "input_shapes": input_shapes,
        "workspace_mb": workspace_mb,
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(build_seconds, 3),
    }
    log(f"{spec.name}: wrote {out_path} ({meta['engine_bytes']} bytes) in {build_seconds:.1f} s")
    return meta


def _component_matches(
    old: Mapping[str, Any], onnx_path: Path, spec: ComponentSpec, engine_dir: Path, identity: str | None = None
) -> bool:
    if not (engine_dir / str(old.get("engine", ""))).is_file():
        return False
    want_profiles = {p: {n: d.to_dict() for n, d in dims.items()} for p, dims in spec.profile_dims().items()}
    if old.get("profiles") != want_profiles:
        return False
    return old.get("onnx_sha256") == (identity or onnx_identity_sha256(onnx_path))


def write_engine_dir(
    export_dir: Path,
    components: "Iterable[tuple[ComponentSpec, Path]] | Mapping[str, tuple[ComponentSpec, Path]]",
    flavor: "str | Flavor" = "auto",
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    log: Log | None = None,
    *,
    compute_capabilities: Sequence[CCLike] | None = None,
    force: bool = False,
    verbose: bool = False,
    onnx_sha256s: Mapping[str, str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build every component into ``DIR/engines/<flavor>-<version>[-sm<cc>]/`` and write ``engines.json``.

    `components`: (spec, onnx path) pairs (or {name: (spec, onnx path)}). A component whose engine
    already exists in that directory for the same ONNX identity and profiles is kept unless `force`.
    `onnx_sha256s`: {component: ONNX identity} when the caller knows them (the manifest); the rest are
    computed with `onnx_identity_sha256`.
    Returns (engine directory, metadata written to its engines.json).
    """
    log = log or _noop
    fl = resolve_flavor(flavor)
    pairs = list(components.values()) if isinstance(components, Mapping) else list(components)
    if not pairs:
        raise UserError("no components to build engines for")

    if fl.is_rtx:
        targets = list(compute_capabilities or [])
        if targets and not (len(targets) == 1 and str(targets[0]).strip().lower() == "current"):
            recorded = [normalize_cc(t) for t in targets]
        elif targets:
            here = current_compute_capability()
            recorded = [here] if here else []
        else:
            recorded = []
        dir_cc = recorded[0] if len(recorded) == 1 else None
        dir_name = engine_dir_name(fl.name, fl.version, dir_cc, [] if dir_cc else recorded)
    else:
        dir_cc = current_compute_capability()
        dir_name = engine_dir_name(fl.name, fl.version, dir_cc)
    engine_dir = engines_root(export_dir) / dir_name
    engine_dir.mkdir(parents=True, exist_ok=True)

    previous: dict[str, Any] = {}
    if not force and (engine_dir / "engines.json").is_file():
        try:
            previous = dict(load_metadata(engine_dir).get("components", {}))
        except UserError:
            previous = {}

    built: dict[str, dict[str, Any]] = {}
    for spec, onnx_path in pairs:
        onnx_path = Path(onnx_path)
        old = previous.get(spec.name)
        identity = (onnx_sha256s or {}).get(spec.name)
        if old is not None and onnx_path.is_file() and _component_matches(old, onnx_path, spec, engine_dir, identity):
            log(f"{spec.name}: engine is up to date ({engine_dir / old['engine']})")
            built[spec.name] = dict(old)
            continue
        m = build_engine(
            onnx_path,
            spec,
            engine_dir / f"{spec.name}.engine",
            fl,
            workspace_mb=workspace_mb,
            timing_cache=timing_cache,
            log=log,
            compute_capabilities=compute_capabilities,
            verbose=verbose,
            onnx_sha256=identity,
        )
        built[spec.name] = m

    first = next(iter(built.values()))
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "flavor": fl.name,
        "version": fl.version,
        "compute_capability": first.get("compute_capability"),
        "compute_targets": first.get("compute_targets", []),
        "components": {
            name: {k: v for k, v in m.items() if k not in ("flavor", "version", "component")}
            for name, m in built.items()
        },
    }
    save_metadata(engine_dir, meta)
    log(f"engines for {len(built)} component(s) in {engine_dir}")
    return engine_dir, meta
