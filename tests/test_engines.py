"""Engine building with the real TensorRT-RTX builder (ahead-of-time, no GPU needed), trtexec lines, and the
engine-metadata check. Skipped as a whole when TensorRT-RTX is not installed."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

trt = pytest.importorskip("tensorrt_rtx_bindings")
onnx = pytest.importorskip("onnx")
np = pytest.importorskip("numpy")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mmexport.engines import (  # noqa: E402
    EngineBuildError,
    OnnxParseError,
    build_engine,
    check_engine_metadata,
    engine_dir_name,
    find_engine_dir,
    load_metadata,
    normalize_cc,
    resolve_flavor,
    trtexec_command,
    write_engine_dir,
)
from mmexport.engines.flavors import available_flavors  # noqa: E402
from mmexport.errors import UserError  # noqa: E402
from mmexport.spec import ComponentSpec, Dim, TensorSpec  # noqa: E402

HIDDEN = 16
VOCAB = 32
RTX_VERSION = trt.__version__


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_model(path: Path, *, external_data: bool = True) -> Path:
    """probs = Softmax((x + E[ids]) @ W + B), x: [batch, seq, 16] float32, ids: [batch, seq] int64."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "E"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),
        helper.make_node("Add", ["x", "emb"], ["xe"]),
        helper.make_node("MatMul", ["xe", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external_data:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0
        )
    else:
        onnx.save_model(model, str(path))
    return path


def _spec(name: str = "tiny", *, profiles: bool = True, ids_dtype: str = "int64") -> ComponentSpec:
    dims = {"batch": Dim("batch", 1, 1, 2), "seq": Dim("seq", 1, 8, 32)}
    profs = (
        {
            "prefill": {"seq": Dim("seq", 2, 16, 32)},
            "decode": {"seq": Dim("seq", 1, 1, 1), "batch": Dim("batch", 1, 2, 2)},
        }
        if profiles
        else {}
    )
    return ComponentSpec(
        name=name,
        inputs=(
            TensorSpec("x", "float32", ("batch", "seq", HIDDEN)),
            TensorSpec("ids", ids_dtype, ("batch", "seq")),
        ),
        outputs=(TensorSpec("probs", "float32", ("batch", "seq", HIDDEN)),),
        dims=dims,
        profiles=profs,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("onnx")
    _tiny_model(d / "tiny.onnx")
    return d


@pytest.fixture(scope="module")
def rtx():
    return resolve_flavor("tensorrt-rtx")


# ---------------------------------------------------------------------------------------------- flavours


def test_import_loads_no_tensorrt_and_no_torch():
    code = (
        "import sys, mmexport.engines, mmexport.engines.builder, mmexport.engines.trtexec\n"
        "bad = [m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'tensorrt_rtx', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve_flavor(rtx):
    assert rtx.name == "tensorrt-rtx"
    assert rtx.version == RTX_VERSION
    assert rtx.module is trt
    assert "tensorrt-rtx" in available_flavors()
    auto = resolve_flavor("auto")
    assert auto.name == ("tensorrt" if "tensorrt" in available_flavors() else "tensorrt-rtx")
    assert resolve_flavor(rtx) is rtx
    with pytest.raises(UserError, match="unknown TensorRT flavour"):
        resolve_flavor("onnxruntime")


@pytest.mark.skipif("tensorrt" in available_flavors(), reason="NVIDIA TensorRT is installed here")
def test_missing_flavor_has_install_hint():
    with pytest.raises(UserError, match="tensorrt is not available.*install NVIDIA TensorRT"):
        resolve_flavor("tensorrt")


# ---------------------------------------------------------------------------------------------- builds


def test_build_engine_two_profiles(model_dir: Path, tmp_path: Path, rtx):
    onnx_path = model_dir / "tiny.onnx"
    assert (model_dir / "tiny.onnx.data").is_file()  # weights are external: parse_from_file must find them
    out = tmp_path / "tiny.engine"
    lines: list[str] = []
    meta = build_engine(onnx_path, _spec(), out, rtx, workspace_mb=64, log=lines.append)

    assert out.is_file() and out.stat().st_size > 0
    assert meta["engine_bytes"] == out.stat().st_size
    assert meta["engine_sha256"] == _sha256(out)
    assert meta["flavor"] == "tensorrt-rtx" and meta["version"] == RTX_VERSION
    assert meta["onnx_sha256"] == _sha256(onnx_path)
    assert meta["component"] == "tiny" and meta["onnx"] == "tiny.onnx" and meta["engine"] == "tiny.engine"
    # No explicit target: TensorRT-RTX's default, portable across compute capability 8.0+.
    assert meta["compute_capability"] is None and meta["compute_targets"] == []
    assert meta["profile_names"] == ["prefill", "decode"]
    assert meta["profiles"]["decode"]["seq"] == {"min": 1, "opt": 1, "max": 1}
    assert meta["profiles"]["prefill"]["batch"] == {"min": 1, "opt": 1, "max": 2}
    assert meta["input_shapes"]["prefill"]["x"] == {"min": [1, 2, 16], "opt": [1, 16, 16], "max": [2, 32, 16]}
    assert meta["input_shapes"]["decode"]["ids"] == {"min": [1, 1], "opt": [2, 1], "max": [2, 1]}
    assert meta["workspace_mb"] == 64
    assert meta["build_seconds"] >= 0
    json.dumps(meta)  # JSON-serialisable as it is
    assert any("building with tensorrt-rtx" in line for line in lines)


def test_build_engine_explicit_target_and_timing_cache_ignored(tmp_path: Path, rtx):
    onnx_path = _tiny_model(tmp_path / "inline.onnx", external_data=False)
    cache = tmp_path / "timing.cache"
    lines: list[str] = []
    meta = build_engine(
        onnx_path,
        _spec(profiles=False),
        tmp_path / "inline.engine",
        rtx,
        timing_cache=cache,
        log=lines.append,
        compute_capabilities=["sm86"],
    )
    assert meta["compute_capability"] == "8.6" and meta["compute_targets"] == ["8.6"]
    assert meta["profile_names"] == ["default"]
    assert (tmp_path / "inline.engine").stat().st_size > 0
    assert not cache.exists()  # TensorRT-RTX has no timing cache
    assert any("no timing cache" in line for line in lines)


def test_write_engine_dir_and_check(model_dir: Path, tmp_path: Path, rtx):
    onnx_path = model_dir / "tiny.onnx"
    comps = [(_spec("text_decoder"), onnx_path), (_spec("tiny_head", profiles=False), onnx_path)]
    engine_dir, meta = write_engine_dir(tmp_path, comps, rtx)

    assert engine_dir == tmp_path / "engines" / f"tensorrt-rtx-{RTX_VERSION}"
    assert engine_dir.name == engine_dir_name("tensorrt-rtx", RTX_VERSION)
    for name in ("text_decoder", "tiny_head"):
        assert (engine_dir / f"{name}.engine").stat().st_size > 0
    on_disk = load_metadata(engine_dir)
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["flavor"] == "tensorrt-rtx" and on_disk["version"] == RTX_VERSION
    assert set(on_disk["components"]) == {"text_decoder", "tiny_head"}
    assert find_engine_dir(tmp_path, "tensorrt-rtx", RTX_VERSION, "8.9") == engine_dir

    shas = {"text_decoder": _sha256(onnx_path), "tiny_head": _sha256(onnx_path)}
    check_engine_metadata(on_disk, shas, rtx, None)
    check_engine_metadata(on_disk, shas, ("tensorrt-rtx", RTX_VERSION), "8.9", export_dir=tmp_path)

    # Unchanged ONNX and profiles: the engines are reused, not rebuilt.
    lines: list[str] = []
    write_engine_dir(tmp_path, comps, rtx, log=lines.append)
    assert sum("up to date" in line for line in lines) == 2


def test_parser_errors_are_listed(tmp_path: Path, rtx):
    nodes = [
        helper.make_node("FancyOp", ["x"], ["y"], domain="my.domain", name="fancy"),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad))
    spec = ComponentSpec(
        "bad",
        (TensorSpec("x", "float32", ("b", 4)),),
        (TensorSpec("z", "float32", ("b", 4)),),
        {"b": Dim("b", 1, 1, 4)},
    )
    with pytest.raises(OnnxParseError) as ei:
        build_engine(bad, spec, tmp_path / "bad.engine", rtx)
    err = ei.value
    assert isinstance(err, UserError)
    assert err.errors and "node 0" in err.errors[0] and "FancyOp" in err.errors[0] and "'fancy'" in err.errors[0]
    assert "could not parse" in str(err) and "FancyOp" in str(err)
    assert not (tmp_path / "bad.engine").exists()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file at all")
    with pytest.raises(OnnxParseError, match="MODEL_DESERIALIZE_FAILED"):
        build_engine(garbage, spec, tmp_path / "garbage.engine", rtx)


def test_missing_external_data_is_a_parse_error(tmp_path: Path, rtx):
    onnx_path = _tiny_model(tmp_path / "moved.onnx")
    (tmp_path / "moved.onnx.data").unlink()
    with pytest.raises(OnnxParseError):
        build_engine(onnx_path, _spec(), tmp_path / "moved.engine", rtx)


def test_spec_mismatch_is_reported(model_dir: Path, tmp_path: Path, rtx):
    with pytest.raises(EngineBuildError, match="ids: dtype int64 in the ONNX graph, int32 in the spec"):
        build_engine(model_dir / "tiny.onnx", _spec(ids_dtype="int32"), tmp_path / "t.engine", rtx)
    with pytest.raises(UserError, match="ONNX file not found"):
        build_engine(tmp_path / "nope.onnx", _spec(), tmp_path / "t.engine", rtx)


def test_build_failure_lists_builder_errors(model_dir: Path, tmp_path: Path, rtx):
    # TensorRT-RTX cannot compile an FP32 GEMM for Turing (SM 7.5): the build fails with its reason.
    with pytest.raises(EngineBuildError, match="failed to build") as ei:
        build_engine(model_dir / "tiny.onnx", _spec(), tmp_path / "t.engine", rtx, compute_capabilities=["7.5"])
    assert ei.value.errors
    assert not (tmp_path / "t.engine").exists()


# ---------------------------------------------------------------------------------------------- trtexec


def test_trtexec_command_one_profile():
    cmd = trtexec_command(
        Path("/m/tiny.onnx"), _spec(profiles=False), Path("/e/tiny.engine"), 2048, Path("/c/timing.cache")
    )
    assert cmd.startswith("trtexec --onnx=/m/tiny.onnx --saveEngine=/e/tiny.engine --stronglyTyped ")
    assert "--minShapes=x:1x1x16,ids:1x1" in cmd
    assert "--optShapes=x:1x8x16,ids:1x8" in cmd
    assert "--maxShapes=x:2x32x16,ids:2x32" in cmd
    assert "--profile" not in cmd
    assert "--memPoolSize=workspace:2048M" in cmd
    assert "--timingCacheFile=/c/timing.cache" in cmd


def test_trtexec_command_two_profiles():
    cmd = trtexec_command(Path("a.onnx"), _spec(), Path("a.engine"), None, None)
    args = cmd.split()
    i0, i1 = args.index("--profile=0"), args.index("--profile=1")
    assert args[i0 + 1 : i0 + 4] == [
        "--minShapes=x:1x2x16,ids:1x2",
        "--optShapes=x:1x16x16,ids:1x16",
        "--maxShapes=x:2x32x16,ids:2x32",
    ]
    assert args[i1 + 1 : i1 + 4] == [
        "--minShapes=x:1x1x16,ids:1x1",
        "--optShapes=x:2x1x16,ids:2x1",
        "--maxShapes=x:2x1x16,ids:2x1",
    ]
    assert "--memPoolSize" not in cmd and "--timingCacheFile" not in cmd


def test_trtexec_command_quotes_paths_and_odd_names():
    spec = ComponentSpec(
        "odd",
        (TensorSpec("input:0", "float32", ("n", 3)),),
        (TensorSpec("out", "float32", ("n", 3)),),
        {"n": Dim("n", 1, 2, 4)},
    )
    cmd = trtexec_command(Path("/my models/a.onnx"), spec, Path("/out/a.engine"), 512, None)
    assert "'--onnx=/my models/a.onnx'" in cmd
    assert "input:0" in cmd and "1x3" in cmd


# ---------------------------------------------------------------------------------------------- metadata check


def _meta(**over):
    base = {
        "format": 1,
        "flavor": "tensorrt",
        "version": "10.3.0",
        "compute_capability": "8.7",
        "compute_targets": ["8.7"],
        "components": {
            "vision_encoder": {"onnx_sha256": "a" * 64, "engine": "vision_encoder.engine"},
            "text_decoder": {"onnx_sha256": "b" * 64, "engine": "text_decoder.engine"},
        },
    }
    base.update(over)
    return base


SHAS = {"vision_encoder": "a" * 64, "text_decoder": "b" * 64}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    assert "rebuild with `mmexport engines /x`" in msg
    return msg


def test_check_engine_metadata_passes_on_match():
    check_engine_metadata(_meta(), SHAS, ("tensorrt", "10.3.0"), "8.7", export_dir="/x")
    check_engine_metadata(_meta(), SHAS, "tensorrt 10.3.0", (8, 7))
    check_engine_metadata(_meta(), {"vision_encoder": "A" * 64}, ("tensorrt", "10.3.0"), 87)
    check_engine_metadata(_meta(), SHAS, ("tensorrt", "10.3.0"), None)  # no GPU known: cc not checked
    rtx_meta = _meta(flavor="tensorrt-rtx", version="1.7.1.116", compute_capability=None, compute_targets=[])
    for cc in ("8.0", "8.6", "8.9", "12.0"):
        check_engine_metadata(rtx_meta, SHAS, ("tensorrt-rtx", "1.7.1.116"), cc)


def test_check_engine_metadata_version_mismatch():
    with pytest.raises(UserError) as e:
        check_engine_metadata(_meta(), SHAS, ("tensorrt", "10.7.0"), "8.7", export_dir="/x")
    assert "engine vision_encoder was built by tensorrt 10.3.0 but tensorrt 10.7.0 is installed" in _one_line(e)
    with pytest.raises(UserError) as e:
        check_engine_metadata(_meta(), SHAS, ("tensorrt-rtx", "10.3.0"), "8.7", export_dir="/x")
    assert "tensorrt-rtx 10.3.0 is installed" in _one_line(e)


def test_check_engine_metadata_cc_mismatch():
    with pytest.raises(UserError) as e:
        check_engine_metadata(_meta(), SHAS, ("tensorrt", "10.3.0"), "8.6", export_dir="/x")
    assert "for sm87 but this GPU is sm86" in _one_line(e)
    rtx_meta = _meta(flavor="tensorrt-rtx", version="1.7.1", compute_capability=None, compute_targets=[])
    with pytest.raises(UserError) as e:  # Turing is not among TensorRT-RTX's default targets
        check_engine_metadata(rtx_meta, SHAS, ("tensorrt-rtx", "1.7.1"), "7.5", export_dir="/x")
    assert "this GPU is sm75" in _one_line(e)
    multi = _meta(flavor="tensorrt-rtx", version="1.7.1", compute_capability=None, compute_targets=["8.6", "12.0"])
    check_engine_metadata(multi, SHAS, ("tensorrt-rtx", "1.7.1"), "12.0")
    with pytest.raises(UserError) as e:
        check_engine_metadata(multi, SHAS, ("tensorrt-rtx", "1.7.1"), "8.9", export_dir="/x")
    assert "for sm86+sm120 but this GPU is sm89" in _one_line(e)


def test_check_engine_metadata_sha_mismatch_and_missing_component():
    with pytest.raises(UserError) as e:
        check_engine_metadata(
            _meta(), {**SHAS, "text_decoder": "c" * 64}, ("tensorrt", "10.3.0"), "8.7", export_dir="/x"
        )
    assert "engine text_decoder was built by tensorrt 10.3.0 from a different ONNX" in _one_line(e)
    with pytest.raises(UserError) as e:
        check_engine_metadata(_meta(), {"projector": "d" * 64}, ("tensorrt", "10.3.0"), "8.7", export_dir="/x")
    assert "no engine for component projector" in _one_line(e)


def test_check_engine_metadata_accepts_a_single_component_dict(model_dir: Path, tmp_path: Path, rtx):
    meta = build_engine(model_dir / "tiny.onnx", _spec(profiles=False), tmp_path / "tiny.engine", rtx)
    check_engine_metadata(meta, {"tiny": _sha256(model_dir / "tiny.onnx")}, rtx, "8.6")
    with pytest.raises(UserError, match="from a different ONNX"):
        check_engine_metadata(meta, {"tiny": "0" * 64}, rtx, "8.6")


def test_normalize_cc():
    assert normalize_cc("8.7") == normalize_cc("87") == normalize_cc("sm87") == normalize_cc(87) == "8.7"
    assert normalize_cc((12, 0)) == normalize_cc("sm_120") == normalize_cc(120) == "12.0"
    assert normalize_cc(None) is None
    with pytest.raises(ValueError):
        normalize_cc("ampere")
    assert engine_dir_name("tensorrt", "10.3.0", "8.7") == "tensorrt-10.3.0-sm87"
    assert engine_dir_name("tensorrt-rtx", "1.7.1", None, ["8.6", "12.0"]) == "tensorrt-rtx-1.7.1-sm86+sm120"
