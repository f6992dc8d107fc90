"""TensorRT / TensorRT-RTX engines for exported components.

Importing this package imports neither TensorRT flavour (nor torch): the flavour is imported by
`resolve_flavor`, when an engine is built. Whole-artifact commands (build_engines, trtexec_lines,
adopt_engines) live in `mmexport.engines.commands`, which also runs as `python -m` for the adopt step.
"""
from __future__ import annotations

from mmexport.engines.builder import EngineBuildError, OnnxParseError, build_engine, write_engine_dir
from mmexport.runtime.flavors import FLAVORS, Flavor, available_flavors, resolve_flavor
from mmexport.artifact.engines import (
    METADATA_FILE,
    check_engine_metadata,
    combine_onnx_identity,
    current_compute_capability,
    engine_dir_name,
    external_data_files,
    find_engine_dir,
    list_engine_dirs,
    load_metadata,
    normalize_cc,
    onnx_identity_sha256,
)
from mmexport.engines.trtexec import trtexec_command

__all__ = [
    "FLAVORS",
    "METADATA_FILE",
    "EngineBuildError",
    "Flavor",
    "OnnxParseError",
    "available_flavors",
    "build_engine",
    "check_engine_metadata",
    "combine_onnx_identity",
    "current_compute_capability",
    "engine_dir_name",
    "external_data_files",
    "find_engine_dir",
    "list_engine_dirs",
    "load_metadata",
    "normalize_cc",
    "onnx_identity_sha256",
    "resolve_flavor",
    "trtexec_command",
    "write_engine_dir",
]
