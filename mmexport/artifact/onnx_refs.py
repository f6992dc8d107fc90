"""The external-data locations an ONNX file refers to, read straight from the protobuf wire format.

ONNX Runtime opens every `location` a tensor's `external_data` names, relative to the .onnx file's
folder. The runtime must know them before it hands a graph to ONNX Runtime (a location may not
leave the artifact directory, and must be one of the component's hashed data files), but the
runtime does not depend on the `onnx` package; the few messages that can hold a tensor are walked
here instead (field numbers from onnx/onnx.proto3, stable since ONNX 1.0):

  ModelProto.graph 7, .functions 25, .training_info 20 (-> initialization 1, algorithm 2: graphs)
  GraphProto.node 1, .initializer 5, .sparse_initializer 15
  NodeProto.attribute 5;  FunctionProto.node 7;  SparseTensorProto.values 1, .indices 2
  AttributeProto.t 5, .g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23
  TensorProto.name 8, .external_data 13 (StringStringEntryProto: key 1, value 2), .data_location 14

Everything else (weights stored inline, strings, shapes) is skipped by its length, so a scan reads
each byte once and never decodes tensor data.
"""
from __future__ import annotations

import mmap
import os
from typing import Iterator

# message kind -> {field number: kind of the embedded message}
_CHILDREN = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


class OnnxScanError(ValueError):
    pass


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise OnnxScanError("truncated or malformed varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of each field in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i, end)
            yield field, 0, v, i
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise OnnxScanError("a length-delimited field runs past its message")
            yield field, 2, i, i + n
            i += n
        else:
            raise OnnxScanError(f"unsupported protobuf wire type {wire}")
        if i > end:
            raise OnnxScanError("a field runs past its message")


def _tensor_refs(buf, start: int, end: int) -> list[tuple[str, str]]:
    name, locations = "", []
    for field, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if field == 8:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == 13:
            key = value = None
            for f2, w2, a2, b2 in _fields(buf, a, b):
                if w2 == 2 and f2 == 1:
                    key = bytes(buf[a2:b2]).decode("utf-8", "surrogateescape")
                elif w2 == 2 and f2 == 2:
                    value = bytes(buf[a2:b2]).decode("utf-8", "surrogateescape")
            if key == "location":
                locations.append(value or "")
    return [(name, loc) for loc in locations]


def external_data_refs(path: "str | os.PathLike[str]") -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor in the ONNX file at `path` that names an external-data
    location (whatever its data_location says: ONNX Runtime is not trusted to ignore it). Raises
    OnnxScanError for a file that is not a well-formed protobuf."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OnnxScanError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                refs: list[tuple[str, str]] = []
                stack = [("model", 0, size)]
                while stack:
                    kind, start, end = stack.pop()
                    if kind == "tensor":
                        refs += _tensor_refs(buf, start, end)
                        continue
                    children = _CHILDREN[kind]
                    for field, wire, a, b in _fields(buf, start, end):
                        if wire == 2 and field in children:
                            stack.append((children[field], a, b))
                return refs
            finally:
                buf.release()
