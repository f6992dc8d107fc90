"""The TensorRT backend: one deserialized engine per component, run with cuda-python. Torch-free.

`TrtRunner` shares the Runner interface (activate / infer / deactivate). Nothing heavy is imported at
module import: TensorRT (either flavour) and cuda-python are imported by `activate()`.

What activate() does:
  1. find the artifact directory (the folder holding manifest.json above the component's ONNX file);
  2. pick the engine directory for the installed TensorRT flavour/version and this GPU
     (`resolve_engine`), and refuse engines that do not fit with a one-line UserError saying to rebuild
     (other flavour or version, other compute capability, ONNX or weights changed since the build);
  3. deserialize the engine, create one execution context and one CUDA stream.

What infer() does, per call:
  pick the optimization profile whose [min, max] ranges hold the feed (the narrowest one when several
  do: a decode step fits both the decoder's prefill and decode profiles and gets decode), switch to it,
  set_input_shape for every input, size the outputs with get_tensor_shape, grow (never shrink) one device
  buffer per I/O tensor, copy the inputs host->device, set_tensor_address for all I/O, execute_async_v3
  on the stream, copy the outputs back, synchronize.

Limits: host memory is pageable (no pinned staging), the KV cache makes a host round trip every step,
outputs whose shape depends on input values (no IOutputAllocator) are refused, BF16/FP8 I/O is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifact.engines import (
    check_engine_metadata,
    current_compute_capability,
    engines_root,
    find_engine_dir,
    list_engine_dirs,
    load_metadata,
    normalize_cc,
)
from ..errors import UserError
from ..spec import ComponentSpec
from .backends import Runner

# TensorRT DataType.name -> numpy dtype
_NP_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "INT8": np.int8,
    "UINT8": np.uint8,
}

CUDA_PYTHON_HINT = "install cuda-python (`pip install cuda-python`; on Jetson pick the version matching JetPack's CUDA)"

# (min, opt, max) shapes of every dynamic input, one dict per optimization profile (index order).
ProfileTable = Sequence[Mapping[str, Sequence[Sequence[int]]]]


# --------------------------------------------------------------------------------------------------
# Profile selection (pure Python: unit-tested without a GPU)
# --------------------------------------------------------------------------------------------------


def profile_table_from_metadata(comp_meta: Mapping[str, Any]) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """The profile table from one component's engines.json entry (`input_shapes` in `profile_names` order)."""
    shapes = comp_meta.get("input_shapes") or {}
    names = comp_meta.get("profile_names") or list(shapes)
    table = []
    for p in names:
        table.append(
            {inp: tuple(tuple(int(d) for d in mm[w]) for w in ("min", "opt", "max")) for inp, mm in shapes[p].items()}
        )
    return table


def select_profile(table: ProfileTable, shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the optimization profile whose ranges hold every input shape in `shapes`.

    Among the profiles that fit, the narrowest wins (smallest sum of max - min over every dynamic axis),
    then the one whose opt shapes are closest, then the lowest index. An engine without profiles (no
    dynamic input) gives 0. Raises UserError naming the ranges when no profile fits.
    """
    if not table:
        return 0
    best: tuple[int, int, int] | None = None
    for index, prof in enumerate(table):
        fits, width, dist = True, 0, 0
        for name, (lo, opt, hi) in prof.items():
            shape = tuple(shapes.get(name, ()))
            if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
                fits = False
                break
            width += sum(b - a for a, b in zip(lo, hi))
            dist += sum(abs(s - o) for s, o in zip(shape, opt))
        if fits and (best is None or (width, dist, index) < best):
            best = (width, dist, index)
    if best is None:
        got = ", ".join(f"{n}={list(shapes.get(n, ()))}" for n in table[0])
        ranges = "; ".join(
            f"profile {i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _o, hi) in p.items())
            for i, p in enumerate(table)
        )
        raise UserError(f"no optimization profile of the engine holds the input shapes {got} ({ranges})")
    return best[2]


# --------------------------------------------------------------------------------------------------
# Which engine (plain Python: unit-tested without a GPU)
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineChoice:
    flavor: Any  # a resolved mmexport.engines.Flavor
    engine_dir: Path
    meta: dict[str, Any]  # the whole engines.json
    component: str

    @property
    def component_meta(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.meta.items() if k != "components"}, **self.meta["components"][self.component]}

    @property
    def engine_path(self) -> Path:
        """The engine file engines.json names: a plain relative path that stays inside its engine directory."""
        from ..artifact.paths import resolve_inside

        rel = self.meta["components"][self.component].get("engine")
        return resolve_inside(self.engine_dir, rel, f"{self.engine_dir / 'engines.json'}: components.{self.component}.engine")


def find_artifact_dir(path: "str | Path") -> Path:
    """The artifact directory (holding manifest.json) at or above `path`."""
    p = Path(path).resolve()
    for d in [p, *p.parents] if p.is_dir() else list(p.parents):
        if (d / "manifest.json").is_file():
            return d
    raise UserError(f"{path}: not inside an mmexport artifact directory (no manifest.json above it)")


def resolve_engine(
    artifact_dir: "str | Path",
    component: str,
    flavor: Any = "auto",
    compute_capability: Any = "current",
    manifest: Any = None,
) -> EngineChoice:
    """The engine of `component` for the installed TensorRT flavour and this GPU, checked against the manifest.

    `flavor`: "auto" (each installed flavour in turn, NVIDIA TensorRT first, until one has engines here),
    a flavour name or a resolved Flavor. `compute_capability`: "current" reads this GPU's; None skips the
    check. Raises a one-line UserError saying to rebuild when there are no engines for this flavour,
    version and GPU, or when they were built from a different ONNX (graph or weights).
    """
    from ..artifact.engines import manifest_onnx_identities
    from .flavors import Flavor, available_flavors, resolve_flavor
    from .manifest import load_manifest

    artifact_dir = Path(artifact_dir)
    rebuild = f"rebuild with `mmexport engines {artifact_dir}`"
    cc = current_compute_capability() if compute_capability == "current" else normalize_cc(compute_capability)
    m = manifest if manifest is not None else load_manifest(artifact_dir, check_files=False)
    if component not in m.components:
        raise UserError(f"{artifact_dir}: no component {component!r} in the manifest")

    if isinstance(flavor, Flavor):
        candidates = [flavor]
    elif (flavor or "auto") == "auto":
        present = available_flavors()
        if not present:
            resolve_flavor("auto")  # raises the install hint
        candidates = []
        errors = []
        for name in present:
            try:
                candidates.append(resolve_flavor(name))
            except UserError as e:
                errors.append(str(e))
        if not candidates:
            raise UserError(" / ".join(errors))
    else:
        candidates = [resolve_flavor(flavor)]

    chosen = None
    for fl in candidates:
        d = find_engine_dir(artifact_dir, fl.name, fl.version, cc)
        if d is not None:
            chosen = (fl, d)
            break
    if chosen is None:
        found = [d.name for d, _ in list_engine_dirs(artifact_dir)]
        have = ", ".join(f"{fl.name} {fl.version}" for fl in candidates)
        on = f" for sm{cc.replace('.', '')}" if cc else ""
        where = f"found {', '.join(found)}" if found else f"{engines_root(artifact_dir)} has none"
        raise UserError(f"no TensorRT engines for {have}{on} in {artifact_dir} ({where}); {rebuild}")
    fl, engine_dir = chosen
    meta = load_metadata(engine_dir)
    identity = manifest_onnx_identities(m)[component]
    check_engine_metadata(meta, {component: identity}, fl, cc, export_dir=artifact_dir)
    choice = EngineChoice(fl, engine_dir, meta, component)
    if not choice.engine_path.is_file():
        raise UserError(f"engine file {choice.engine_path} is missing; {rebuild}")
    return choice


# --------------------------------------------------------------------------------------------------
# cuda-python
# --------------------------------------------------------------------------------------------------


def _import_cudart() -> Any:
    """cuda-python's runtime API module (`cuda.bindings.runtime`; `cuda.cudart` in older releases)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 / cuda-bindings

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]  # older cuda-python

        return cudart
    except ImportError:
        raise UserError(f"the trt backend needs cuda-python, which is not installed; {CUDA_PYTHON_HINT}") from None


class _Cuda:
    """The few cudart calls the runner uses, each checked (cuda-python returns (error, *results))."""

    def __init__(self, cudart: Any):
        self.rt = cudart

    def call(self, what: str, result: Any) -> Any:
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            try:
                msg = self.rt.cudaGetErrorString(err)[1].decode()
            except Exception:
                msg = str(err)
            raise RuntimeError(f"CUDA {what} failed: {msg}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", self.rt.cudaFree(ptr))

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))


def _grow(capacity: int, need: int) -> int:
    """Next buffer size: at least `need` (and 256 bytes), at least double the old one, 256-byte multiple."""
    size = max(need, 2 * capacity if capacity else need, 256)
    return (size + 255) // 256 * 256


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


class TrtRunner(Runner):
    """A TensorRT engine for one component (either flavour), run with cuda-python.

    `manifest`: the artifact's manifest, as the pipeline passes it (its directory holds the engines, under
    DIR/engines); without one, `artifact_dir` or the directory above `path` is read. `flavor`: "auto" |
    "tensorrt" | "tensorrt-rtx".
    """

    def __init__(
        self,
        path: Path,
        spec: ComponentSpec,
        manifest: Any = None,
        flavor: str = "auto",
        device: int = 0,
        artifact_dir: "str | Path | None" = None,
    ):
        super().__init__(path, spec, manifest)
        self.flavor = flavor
        self.device = int(device)
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else None
        self.choice: EngineChoice | None = None
        self._reset()

    def _reset(self) -> None:
        self._cuda: _Cuda | None = None
        self._stream: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._profile = 0
        self._table: list[dict[str, tuple[tuple[int, ...], ...]]] = []
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, Any] = {}

    def activate(self) -> "TrtRunner":
        artifact_dir = self.manifest.root if self.manifest is not None else (self.artifact_dir or find_artifact_dir(self.path))
        cc = current_compute_capability(self.device)
        # The metadata check comes first: a mismatch says "rebuild" even on a machine that cannot run engines.
        self.choice = resolve_engine(artifact_dir, self.spec.name, self.flavor, cc, manifest=self.manifest)
        cuda = _Cuda(_import_cudart())
        if cc is None:
            raise UserError("the trt backend needs an NVIDIA GPU with a working CUDA driver; none was found")
        trt = self.choice.flavor.module
        cuda.call("cudaSetDevice", cuda.rt.cudaSetDevice(self.device))
        self._cuda = cuda
        try:
            logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.choice.engine_path.read_bytes())
            if self._engine is None:
                raise UserError(
                    f"{self.choice.flavor.label} could not load {self.choice.engine_path}; "
                    f"rebuild with `mmexport engines {artifact_dir}`"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise RuntimeError(f"{self.spec.name}: could not create a TensorRT execution context")
            self._stream = cuda.call("cudaStreamCreate", cuda.rt.cudaStreamCreate())
            mode_in = trt.TensorIOMode.INPUT
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                dt = self._engine.get_tensor_dtype(name)
                np_dt = _NP_DTYPES.get(getattr(dt, "name", str(dt).split(".")[-1]))
                if np_dt is None:
                    raise UserError(f"{self.spec.name}: tensor {name} has type {dt}, which the trt backend cannot feed")
                self._dtypes[name] = np.dtype(np_dt)
                (self._inputs if self._engine.get_tensor_mode(name) == mode_in else self._outputs).append(name)
            missing = [n for n in self.spec.input_names if n not in self._inputs]
            if missing:
                raise UserError(f"engine {self.choice.engine_path} has no input(s) {missing}; rebuild it")
            self._table = self._engine_profile_table()
            self._profile = 0
        except BaseException:
            self.deactivate()
            raise
        return super().activate()

    def _engine_profile_table(self) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
        """Profile ranges as the engine reports them; the metadata's when the engine has none to report."""
        eng = self._engine
        dynamic = [n for n in self._inputs if any(d < 0 for d in tuple(eng.get_tensor_shape(n)))]
        if not dynamic:
            return []
        table = []
        for p in range(eng.num_optimization_profiles):
            prof = {}
            for n in dynamic:
                lo, opt, hi = eng.get_tensor_profile_shape(n, p)
                prof[n] = (tuple(lo), tuple(opt), tuple(hi))
            table.append(prof)
        return table or profile_table_from_metadata(self.choice.component_meta if self.choice else {})

    def deactivate(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            if self._stream is not None:
                try:
                    cuda.call("cudaStreamSynchronize", cuda.rt.cudaStreamSynchronize(self._stream))
                except Exception:
                    pass
            for ptr, _cap in self._buffers.values():
                try:
                    cuda.free(ptr)
                except Exception:
                    pass
            if self._stream is not None:
                try:
                    cuda.call("cudaStreamDestroy", cuda.rt.cudaStreamDestroy(self._stream))
                except Exception:
                    pass
        # Release in dependency order: context, engine, runtime.
        self._context = None
        self._engine = None
        self._runtime = None
        self._reset()
        super().deactivate()

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap or not ptr:
            assert self._cuda is not None
            if ptr:
                self._cuda.free(ptr)
                self._buffers.pop(name, None)
            cap = _grow(cap, nbytes)
            ptr = self._cuda.malloc(cap)
            self._buffers[name] = (ptr, cap)
        return ptr

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx, cuda, stream = self._context, self._cuda, self._stream
        assert ctx is not None and cuda is not None
        handle = int(stream)
        arrays = {}
        for name in self._inputs:
            arr = np.ascontiguousarray(feed[name])
            if arr.dtype != self._dtypes[name]:
                raise UserError(f"{self.spec.name}.{name}: dtype {arr.dtype}, the engine wants {self._dtypes[name]}")
            arrays[name] = arr

        index = select_profile(self._table, {n: a.shape for n, a in arrays.items()})
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, handle):
                raise RuntimeError(f"{self.spec.name}: could not switch to optimization profile {index}")
            self._profile = index
        for name, arr in arrays.items():
            if not ctx.set_input_shape(name, arr.shape):
                raise UserError(f"{self.spec.name}.{name}: the engine rejects input shape {list(arr.shape)}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise RuntimeError(f"{self.spec.name}: TensorRT could not infer the shapes of {list(unresolved)}")

        out_shapes = {}
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(
                    f"{self.spec.name}.{name}: output shape {list(shape)} depends on input values, "
                    "which the trt backend does not support"
                )
            out_shapes[name] = shape

        for name, arr in arrays.items():
            ptr = self._buffer(name, arr.nbytes)
            if arr.nbytes:
                cuda.h2d(ptr, arr, stream)
            ctx.set_tensor_address(name, ptr)
        results = {}
        for name, shape in out_shapes.items():
            out = np.empty(shape, dtype=self._dtypes[name])
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
            results[name] = out
        if not ctx.execute_async_v3(handle):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed")
        for name, out in results.items():
            if out.nbytes:
                cuda.d2h(out, self._buffers[name][0], stream)
        cuda.call("cudaStreamSynchronize", cuda.rt.cudaStreamSynchronize(stream))
        del arrays  # the host inputs had to live until the copies were done
        return {n: results[n] for n in self.spec.output_names if n in results}
