"""The one declaration of every exported component.

A `ComponentSpec` names a graph's inputs and outputs, their dtypes and shapes, and the dynamic dims
(with min/opt/max) those shapes use. The exporter reads it to build `dynamic_shapes` and dummy
inputs, the engine builder reads it to make TensorRT optimization profiles, the manifest stores it,
the runtime checks every feed against it and verify uses it to name what it compares.

This module is plain Python (no numpy, no torch) so every side of the tool can import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

# Shapes are tuples whose entries are either a fixed int or the name of a dynamic dim.
DimRef = Union[int, str]

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


_NUMPY_DTYPES: dict[str, Any] = {}  # declared dtype -> numpy dtype, or None where numpy has none (bfloat16)


def _same_dtype(dt: Any, declared: str) -> bool:
    """`dt` (a numpy dtype, or another library's) is the declared dtype; numpy's compare in C first (str() of a
    numpy dtype costs microseconds, and a decode step checks ~50 inputs)."""
    if declared not in _NUMPY_DTYPES:
        try:
            import numpy as np

            _NUMPY_DTYPES[declared] = np.dtype(declared)
        except (ImportError, TypeError):
            _NUMPY_DTYPES[declared] = None
    want = _NUMPY_DTYPES[declared]
    return (want is not None and dt == want) or str(dt) == declared


@dataclass(frozen=True)
class Dim:
    """A named dynamic dimension and the range an engine or a session must accept.

    `multiple`: the size is always a multiple of this (e.g. patches of whole 2x2 merge blocks).
    `derived`: the size is the sum of these other dims (e.g. total_len = past_len + seq_len); the
    tracer must know, and feeds are checked against it.
    """

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1
    derived: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name}: need 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if self.multiple < 1 or any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"dim {self.name}: min/opt/max must be multiples of {self.multiple}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min": self.min, "opt": self.opt, "max": self.max}
        if self.multiple != 1:
            d["multiple"] = self.multiple
        if self.derived:
            d["derived"] = list(self.derived)
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "Dim":
        return cls(name, d["min"], d["opt"], d["max"], d.get("multiple", 1), tuple(d.get("derived", ())))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[DimRef, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: unknown dtype {self.dtype!r}")

    def dim_names(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.doc:
            d["doc"] = self.doc
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", ""))


@dataclass(frozen=True)
class ComponentSpec:
    """One exported graph: its I/O and the ranges of its dynamic dims.

    `dims` holds every dynamic dim an input uses. Outputs may use further names (for example
    `total_len` of a present KV cache): those follow from the inputs and carry no range.
    `profiles` optionally names several TensorRT optimization profiles, each overriding some dims
    (the decoder has a prefill profile and a decode profile).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Dim] = field(default_factory=dict)
    profiles: dict[str, dict[str, Dim]] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self) -> None:
        for t in self.inputs:
            for n in t.dim_names():
                if n not in self.dims:
                    raise ValueError(f"component {self.name}: input {t.name} uses undeclared dim {n!r}")
        for prof, over in self.profiles.items():
            for n in over:
                if n not in self.dims:
                    raise ValueError(f"component {self.name}: profile {prof} overrides unknown dim {n!r}")
        for d in self.dims.values():
            for n in d.derived:
                if n not in self.dims or self.dims[n].derived:
                    raise ValueError(f"component {self.name}: dim {d.name} derives from unknown or derived dim {n!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def profile_dims(self) -> dict[str, dict[str, Dim]]:
        """Each optimization profile's full dim table (one profile named 'default' when none declared).

        Derived dims take the sums of their parts' min/opt/max within the profile.
        """
        tables = {"default": dict(self.dims)} if not self.profiles else {p: {**self.dims, **o} for p, o in self.profiles.items()}
        for table in tables.values():
            for name, d in list(table.items()):
                if d.derived:
                    parts = [table[n] for n in d.derived]
                    table[name] = Dim(name, sum(p.min for p in parts), sum(p.opt for p in parts),
                                      min(d.max, sum(p.max for p in parts)), d.multiple, d.derived)
        return tables

    def shape_for(self, tensor: TensorSpec, dims: dict[str, Dim], which: str) -> tuple[int, ...]:
        """Concrete shape of `tensor` with each dynamic dim at its `which` (min/opt/max) value."""
        return tuple(getattr(dims[d], which) if isinstance(d, str) else d for d in tensor.shape)

    def check_feed(self, feed: dict[str, Any]) -> None:
        """Raise ValueError when a feed does not match this declaration (names, dtypes, ranks, ranges).

        `feed` values need `.shape` and `.dtype` (numpy arrays or compatible); consistent use of a
        named dim across inputs is checked too.
        """
        names = self.input_names
        if len(feed) != len(names) or not all(n in feed for n in names):  # (once per decode step: kept cheap)
            wanted = set(names)
            missing, extra = [n for n in names if n not in feed], [n for n in feed if n not in wanted]
        else:
            missing = extra = []
        if missing or extra:
            raise ValueError(f"{self.name}: missing inputs {missing}, unexpected inputs {extra}")
        seen: dict[str, int] = {}
        for t in self.inputs:
            arr = feed[t.name]
            if not _same_dtype(arr.dtype, t.dtype):
                raise ValueError(f"{self.name}.{t.name}: dtype {arr.dtype}, declared {t.dtype}")
            if len(arr.shape) != len(t.shape):
                raise ValueError(f"{self.name}.{t.name}: rank {len(arr.shape)}, declared {len(t.shape)}")
            for axis, (got, want) in enumerate(zip(arr.shape, t.shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ValueError(f"{self.name}.{t.name}: axis {axis} is {got}, declared {want}")
                    continue
                if want in seen and seen[want] != got:
                    raise ValueError(f"{self.name}.{t.name}: dim {want}={got} but {seen[want]} elsewhere")
                seen[want] = got
                d = self.dims[want]
                if not (d.min <= got <= d.max):
                    raise ValueError(f"{self.name}.{t.name}: dim {want}={got} outside [{d.min}, {d.max}]")
                if got % d.multiple:
                    raise ValueError(f"{self.name}.{t.name}: dim {want}={got} is not a multiple of {d.multiple}")
        for d in self.dims.values():
            if d.derived and d.name in seen and all(n in seen for n in d.derived):
                if seen[d.name] != sum(seen[n] for n in d.derived):
                    raise ValueError(f"{self.name}: dim {d.name}={seen[d.name]} but {' + '.join(d.derived)} = "
                                     f"{sum(seen[n] for n in d.derived)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {n: d.to_dict() for n, d in self.dims.items()},
        }
        if self.profiles:
            out["profiles"] = {p: {n: d.to_dict() for n, d in over.items()} for p, over in self.profiles.items()}
        if self.doc:
            out["doc"] = self.doc
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComponentSpec":
        dims = {n: Dim.from_dict(n, v) for n, v in d.get("dims", {}).items()}
        profiles = {p: {n: Dim.from_dict(n, v) for n, v in over.items()} for p, over in d.get("profiles", {}).items()}
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            dims=dims,
            profiles=profiles,
            doc=d.get("doc", ""),
        )
