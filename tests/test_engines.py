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
    onnx_identity_sha256,
    resolve_flavor,
    trtexec_command,
    write_engine_dir,
)
from mmexport.runtime.flavors import available_flavors  # noqa: E402
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
    # The identity covers the external weights too: not the .onnx file's sha256 alone.
    assert meta["onnx_sha256"] == onnx_identity_sha256(onnx_path) != _sha256(onnx_path)
    assert meta["onnx_data"] == ["tiny.onnx.data"]
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

    shas = {"text_decoder": onnx_identity_sha256(onnx_path), "tiny_head": onnx_identity_sha256(onnx_path)}
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
    check_engine_metadata(meta, {"tiny": onnx_identity_sha256(model_dir / "tiny.onnx")}, rtx, "8.6")
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


# ---------------------------------------------------------------------------------------------- ONNX identity


def test_onnx_identity_covers_external_data(tmp_path: Path):
    from mmexport.engines import combine_onnx_identity, external_data_files

    onnx_path = _tiny_model(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    assert external_data_files(onnx_path) == ["m.onnx.data"]
    before = onnx_identity_sha256(onnx_path)
    assert before == combine_onnx_identity(_sha256(onnx_path), {"m.onnx.data": _sha256(data)})
    # New weights under an unchanged graph: the .onnx sha256 stays, the identity does not.
    onnx_sha = _sha256(onnx_path)
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert _sha256(onnx_path) == onnx_sha
    assert onnx_identity_sha256(onnx_path) != before
    # Without external data the identity is the file's own sha256 (older metadata stays valid).
    inline = _tiny_model(tmp_path / "inline.onnx", external_data=False)
    assert external_data_files(inline) == []
    assert onnx_identity_sha256(inline) == _sha256(inline)


def test_changed_weights_rebuild_the_engine(tmp_path: Path, rtx):
    onnx_path = _tiny_model(tmp_path / "w.onnx")
    comps = [(_spec("w", profiles=False), onnx_path)]
    write_engine_dir(tmp_path, comps, rtx)
    data = tmp_path / "w.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    lines: list[str] = []
    _, meta = write_engine_dir(tmp_path, comps, rtx, log=lines.append)
    assert not any("up to date" in line for line in lines)
    assert meta["components"]["w"]["onnx_sha256"] == onnx_identity_sha256(onnx_path)


# ---------------------------------------------------------------------------------------------- whole artifacts

import os  # noqa: E402
import shutil  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = {"vision_encoder", "projector", "embed_tokens", "decoder"}


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifacts: Path) -> Path:
    """The session's tiny build (tests/conftest.py); tests here only read it or copy it."""
    return tiny_artifacts


@pytest.fixture
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "art"
    shutil.copytree(tiny_artifact, dest, ignore=shutil.ignore_patterns("engines"))
    return dest


@pytest.fixture(scope="session")
def built_engines(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny artifact (a copy) with TensorRT-RTX engines for every component, built by build_engines."""
    from mmexport.engines.commands import build_engines

    art = tmp_path_factory.mktemp("with-engines") / "art"
    shutil.copytree(tiny_artifact, art, ignore=shutil.ignore_patterns("engines"))  # built here, not reused
    lines: list[str] = []
    engine_dir, meta = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lines.append)
    return art, engine_dir, meta, lines


def test_build_engines_every_component(built_engines):
    from mmexport.artifact.engines import manifest_onnx_identities
    from mmexport.runtime.manifest import load_manifest

    art, engine_dir, meta, lines = built_engines
    assert engine_dir == art / "engines" / f"tensorrt-rtx-{RTX_VERSION}"
    assert set(meta["components"]) == COMPONENTS
    m = load_manifest(art)
    ids = manifest_onnx_identities(m)
    for name, comp in meta["components"].items():
        assert (engine_dir / comp["engine"]).stat().st_size == comp["engine_bytes"] > 0
        # The manifest's identity is the one a fresh hash of .onnx + .onnx.data gives.
        assert comp["onnx_sha256"] == ids[name] == onnx_identity_sha256(m.component_file(name))
        assert comp["onnx_data"] == [f"{name}.onnx.data"]
        assert comp["workspace_mb"] == 256
    dec = meta["components"]["decoder"]
    assert dec["profile_names"] == ["prefill", "decode"]
    assert dec["input_shapes"]["decode"]["inputs_embeds"]["max"][1] == 1
    assert load_metadata(engine_dir) == json.loads(json.dumps(meta))
    check_engine_metadata(load_metadata(engine_dir), ids, ("tensorrt-rtx", RTX_VERSION), "8.6", export_dir=art)


def test_build_engines_keeps_up_to_date_engines(built_engines):
    from mmexport.engines.commands import build_engines

    art, engine_dir, _, _ = built_engines
    lines: list[str] = []
    d, _ = build_engines(art, "tensorrt-rtx", workspace_mb=256, log=lines.append)
    assert d == engine_dir
    assert sum("up to date" in line for line in lines) == len(COMPONENTS)


def test_build_engines_refuses_a_modified_artifact(artifact_copy: Path):
    from mmexport.engines.commands import build_engines

    data = artifact_copy / "onnx" / "projector.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="does not match its sha256"):
        build_engines(artifact_copy, "tensorrt-rtx", log=None)


def test_trtexec_lines(tiny_artifact: Path):
    from mmexport.engines.commands import trtexec_lines

    lines = trtexec_lines(tiny_artifact, workspace_mb=1024, timing_cache="engines/timing.cache")
    cmds = [line for line in lines if line.startswith('"$TRTEXEC"')]
    assert len(cmds) == len(COMPONENTS)
    for name in COMPONENTS:
        (cmd,) = [c for c in cmds if f"--onnx=onnx/{name}.onnx " in c]
        assert f"--saveEngine=engines/trtexec/{name}.engine" in cmd
        assert "--stronglyTyped" in cmd and "--memPoolSize=workspace:1024M" in cmd
        assert "--timingCacheFile=engines/timing.cache" in cmd
        assert str(tiny_artifact) not in cmd  # relative paths: they run on the target from DIR
    (dec,) = [c for c in cmds if "decoder.onnx" in c]
    assert "--profile=0" in dec and "--profile=1" in dec
    assert lines[-1] == "python3 -m mmexport.engines.commands adopt . engines/trtexec --flavor tensorrt"
    script = "\n".join(lines)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_trtexec_lines_run_end_to_end_with_a_stand_in_trtexec(artifact_copy: Path, tmp_path: Path):
    """Run the printed lines from DIR with a fake trtexec (writes --saveEngine) and the real adopt step."""
    from mmexport.engines.commands import trtexec_lines
    from mmexport.runtime.trt import resolve_engine

    fake = tmp_path / "fake-trtexec"
    fake.write_text(
        "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in --saveEngine=*) printf 'engine' > \"${a#--saveEngine=}\";; esac; done\n"
    )
    fake.chmod(0o755)
    bindir = Path(sys.executable).parent  # the adopt line calls `python3`: this interpreter's
    if not (bindir / "python3").exists():
        pytest.skip(f"no python3 beside {sys.executable}")
    script = "\n".join(trtexec_lines(artifact_copy, flavor_name_for_path="tensorrt-rtx"))
    env = {**os.environ, "TRTEXEC": str(fake), "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    p = subprocess.run(["bash", "-e"], input=script, text=True, cwd=artifact_copy, env=env, capture_output=True)
    assert p.returncode == 0, p.stderr
    engine_dir = artifact_copy / "engines" / f"tensorrt-rtx-{RTX_VERSION}"  # no GPU here: no -sm suffix
    meta = load_metadata(engine_dir)
    assert meta["built_by"] == "trtexec" and set(meta["components"]) == COMPONENTS
    assert not (artifact_copy / "engines" / "trtexec").exists()
    choice = resolve_engine(artifact_copy, "decoder", "tensorrt-rtx", "8.6")
    assert choice.engine_path.read_bytes() == b"engine"
    assert choice.component_meta["profile_names"] == ["prefill", "decode"]


def test_adopt_engines_records_the_gpu(artifact_copy: Path, rtx):
    from mmexport.engines.commands import adopt_engines
    from mmexport.runtime.trt import resolve_engine

    src = artifact_copy / "engines" / "trtexec"
    src.mkdir(parents=True)
    for name in COMPONENTS - {"projector"}:
        (src / f"{name}.engine").write_bytes(b"x")
    with pytest.raises(UserError, match="no engine for component.*projector"):
        adopt_engines(artifact_copy, src, rtx, "8.7", log=None)
    (src / "projector.engine").write_bytes(b"x")
    engine_dir, meta = adopt_engines(artifact_copy, "engines/trtexec", rtx, "sm87", log=None)
    assert engine_dir.name == f"tensorrt-rtx-{RTX_VERSION}-sm87"
    assert meta["compute_capability"] == "8.7"
    assert resolve_engine(artifact_copy, "projector", rtx, "8.7").engine_dir == engine_dir
    with pytest.raises(UserError, match=f"for sm86 .*found tensorrt-rtx-{RTX_VERSION}-sm87.*rebuild with"):
        resolve_engine(artifact_copy, "projector", rtx, "8.6")


# ---------------------------------------------------------------------------------------------- trt runner


def test_trt_runtime_imports_without_tensorrt_or_cuda():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'tensorrt_rtx_bindings', 'tensorrt_rtx', 'cuda', 'torch'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mmexport.runtime.trt import TrtRunner, select_profile\n"
        "from mmexport.spec import ComponentSpec, TensorSpec\n"
        "s = ComponentSpec('c', (TensorSpec('x', 'float32', (2,)),), (TensorSpec('y', 'float32', (2,)),))\n"
        "r = TrtRunner('/nonexistent/onnx/c.onnx', s)\n"
        "assert not r.active\n"
        "bad = [m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'cuda', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _decoder_shapes(seq: int, cache_len: int = 512) -> dict[str, tuple[int, ...]]:
    # the tiny decoder: static KV cache of the recipe's context (512), 2 layers, 2 KV heads, head_dim 24;
    # the runtime feeds the whole cache, or zero-length views of it while it is empty
    shapes = {"inputs_embeds": (1, seq, 96), "position_ids": (3, 1, seq), "cache_mask": (1, cache_len)}
    for i in range(2):
        for kind in ("key", "value"):
            shapes[f"cache_{kind}_{i}"] = (1, 2, cache_len, 24)
    return shapes


def test_select_profile_prefill_vs_decode(built_engines):
    from mmexport.runtime.trt import profile_table_from_metadata, resolve_engine, select_profile

    art, *_ = built_engines
    comp = resolve_engine(art, "decoder", "tensorrt-rtx", None).component_meta
    table = profile_table_from_metadata(comp)
    assert [list(p) for p in table][0][0] == "inputs_embeds" and len(table) == 2
    prefill, decode = comp["profile_names"].index("prefill"), comp["profile_names"].index("decode")
    assert select_profile(table, _decoder_shapes(7, 0)) == prefill  # a request's prompt: the cache is empty
    assert select_profile(table, _decoder_shapes(1, 0)) == prefill  # a one-token prompt
    assert select_profile(table, _decoder_shapes(7)) == prefill  # a prompt after cached tokens
    assert select_profile(table, _decoder_shapes(1)) == decode  # one token: fits both, the narrower profile wins
    with pytest.raises(UserError, match="no optimization profile"):
        select_profile(table, _decoder_shapes(600))
    with pytest.raises(UserError, match="no optimization profile"):
        select_profile(table, _decoder_shapes(1, 513))  # more cache than the context
    # One-profile components: the only profile (or none at all).
    proj = resolve_engine(art, "projector", "tensorrt-rtx", None).component_meta
    assert select_profile(profile_table_from_metadata(proj), {"vision_hidden": (64, 64)}) == 0
    assert select_profile([], {"x": (1,)}) == 0


def test_resolve_engine_refuses_mismatches(built_engines, tmp_path: Path):
    from mmexport.runtime.manifest import write_manifest
    from mmexport.runtime.trt import resolve_engine

    src, *_ = built_engines
    art = tmp_path / "art"
    shutil.copytree(src, art)
    assert resolve_engine(art, "decoder", "auto", "8.9").engine_path.name == "decoder.engine"

    def one_line_rebuild(e: pytest.ExceptionInfo) -> str:
        msg = str(e.value)
        assert "\n" not in msg and f"rebuild with `mmexport engines {art}`" in msg
        return msg

    with pytest.raises(UserError) as e:  # Turing is not among TensorRT-RTX's default targets
        resolve_engine(art, "decoder", "tensorrt-rtx", "7.5")
    assert "this GPU is sm75" in one_line_rebuild(e)

    # Re-exported weights (manifest updated, engines stale): refused.
    data = art / "onnx" / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    mpath = art / "manifest.json"
    write_manifest(art, json.loads(mpath.read_text()))
    with pytest.raises(UserError) as e:
        resolve_engine(art, "decoder", "tensorrt-rtx", "8.6")
    assert "engine decoder was built by" in one_line_rebuild(e) and "from a different ONNX" in str(e.value)
    resolve_engine(art, "projector", "tensorrt-rtx", "8.6")  # the other components are still fine

    # Engines of another TensorRT-RTX version only.
    d = art / "engines" / f"tensorrt-rtx-{RTX_VERSION}"
    d.rename(art / "engines" / "tensorrt-rtx-0.9.0")
    meta = json.loads((art / "engines" / "tensorrt-rtx-0.9.0" / "engines.json").read_text())
    meta["version"] = "0.9.0"
    (art / "engines" / "tensorrt-rtx-0.9.0" / "engines.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        resolve_engine(art, "projector", "tensorrt-rtx", "8.6")
    assert f"no TensorRT engines for tensorrt-rtx {RTX_VERSION}" in one_line_rebuild(e)
    assert "found tensorrt-rtx-0.9.0" in str(e.value)


def test_trt_runner_activate_without_gpu_is_a_user_error(built_engines):
    from mmexport.engines import current_compute_capability
    from mmexport.runtime.manifest import load_manifest
    from mmexport.runtime.trt import TrtRunner

    if current_compute_capability() is not None:
        pytest.skip("a GPU is present: activation would really run")
    art, *_ = built_engines
    m = load_manifest(art)
    runner = TrtRunner(m.component_file("projector"), m.components["projector"], flavor="tensorrt-rtx")
    # The engine fits (flavour, version, ONNX identity); what is missing is cuda-python or the GPU.
    with pytest.raises(UserError, match="cuda-python|needs an NVIDIA GPU"):
        runner.activate()
    assert not runner.active
    assert runner.choice is not None and runner.choice.engine_path.name == "projector.engine"
