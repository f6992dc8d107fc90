"""`mmexport lint` (static TensorRT-risk check) proven against the real TensorRT-RTX parser, and `mmexport doctor`."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmexport.errors import UserError

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("vision_encoder", "projector", "embed_tokens", "decoder")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifacts: Path) -> Path:
    """The session's tiny build (tests/conftest.py); lint only reads it."""
    return tiny_artifacts


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx_bindings")


def _rtx_parse(trt, path_or_model) -> tuple[bool, list[tuple[str, str, str]]]:
    """Parse with the real TensorRT-RTX parser: (ok, [(node name, operator, error code)])."""
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if isinstance(path_or_model, (str, Path)):
        ok = parser.parse_from_file(str(path_or_model))
    else:
        ok = parser.parse(path_or_model.SerializeToString())
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        errors.append((e.node_name(), e.node_operator(), str(e.code()).split(".")[-1]))
    return bool(ok) and not errors, errors


# ---------------------------------------------------------------------------------------------- lint: data


def test_operator_tables_are_consistent():
    from mmexport.lint import CONST_INPUTS, DATA_DEPENDENT_OPS, SHAPE_INPUTS, TRT_SUPPORTED_OPS, TRT_UNSUPPORTED_OPS

    assert not TRT_SUPPORTED_OPS & TRT_UNSUPPORTED_OPS
    assert {"MatMul", "Gather", "LayerNormalization", "Range", "Where", "Attention"} <= TRT_SUPPORTED_OPS
    assert {"Unique", "NonZero", "Compress"} <= set(DATA_DEPENDENT_OPS)
    for op in (*SHAPE_INPUTS, *CONST_INPUTS):
        assert op in TRT_SUPPORTED_OPS, op


def _one_node_model(op: str):
    """A model of one `op` node with plain-tensor inputs built from its schema, or None when its inputs are
    not plain tensors (sequences, optionals)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as TP
    from onnx import helper

    schema = onnx.defs.get_schema(op, 21)
    constraints = {c.type_param_str: list(c.allowed_type_strs) for c in schema.type_constraints}
    types = {"tensor(float)": TP.FLOAT, "tensor(int64)": TP.INT64, "tensor(int32)": TP.INT32,
             "tensor(uint8)": TP.UINT8, "tensor(bool)": TP.BOOL, "tensor(string)": TP.STRING}
    inputs = []
    for i, formal in enumerate(schema.inputs):
        if formal.option == onnx.defs.OpSchema.FormalParameterOption.Optional:
            break
        allowed = constraints.get(formal.type_str, [formal.type_str])
        t = next((types[a] for a in types if a in allowed), None)
        if t is None:
            return None
        inputs.append(helper.make_tensor_value_info(f"in{i}", t, [2, 2]))
    node = helper.make_node(op, [v.name for v in inputs], ["out"], name=f"the_{op}")
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("out", TP.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_every_unsupported_operator_is_rejected_by_the_rtx_parser(trt):
    """The embedded 'N' list (onnx-tensorrt operators.md) holds for TensorRT-RTX: each such node is refused."""
    from mmexport.lint import TRT_UNSUPPORTED_OPS

    checked = 0
    for op in sorted(TRT_UNSUPPORTED_OPS):
        model = _one_node_model(op)
        if model is None:
            continue
        ok, errors = _rtx_parse(trt, model)
        assert not ok, f"{op}: the TensorRT-RTX parser accepted it"
        assert any(name == f"the_{op}" for name, _op, _code in errors), (op, errors)
        checked += 1
    assert checked >= 30  # all but the sequence/optional-typed ones


# ---------------------------------------------------------------------------------------------- lint: graphs


def _risky_model(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    np = pytest.importorskip("numpy")
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="uniq"),
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MyOp", ["r"], ["c"], domain="my.ops", name="custom"),
        helper.make_node("Cast", ["n"], ["n64"], to=TP.INT64, name="cast_n"),
        helper.make_node("Range", ["zero", "n64", "one"], ["rng"], name="range_from_values"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape_x"),
        helper.make_node("Gather", ["xs", "zero"], ["xlen"], name="len_x"),
        helper.make_node("Range", ["zero", "xlen", "one"], ["rng2"], name="range_from_shape"),
        helper.make_node("Reshape", ["x", "shape_in"], ["resh"], name="reshape_from_values"),
        helper.make_node("ReduceSum", ["x", "axes_in"], ["rs"], name="reduce_dyn_axes"),
        helper.make_node("Add", ["d", "d"], ["dd"], name="add_double"),
        helper.make_node("BitwiseAnd", ["i", "i"], ["band"], name="bitand"),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")]
    inputs = [
        helper.make_tensor_value_info("x", TP.FLOAT, [4]),
        helper.make_tensor_value_info("n", TP.INT32, []),
        helper.make_tensor_value_info("shape_in", TP.INT64, [1]),
        helper.make_tensor_value_info("axes_in", TP.INT64, [1]),
        helper.make_tensor_value_info("d", TP.DOUBLE, [4]),
        helper.make_tensor_value_info("i", TP.INT32, [4]),
    ]
    outs = [("u", TP.FLOAT), ("nz", TP.INT64), ("c", TP.FLOAT), ("rng", TP.INT64), ("rng2", TP.INT64),
            ("resh", TP.FLOAT), ("rs", TP.FLOAT), ("dd", TP.DOUBLE), ("band", TP.INT32)]
    graph = helper.make_graph(nodes, "risky", inputs, [helper.make_tensor_value_info(o, t, None) for o, t in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("my.ops", 1)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_lint_flags_what_the_rtx_parser_rejects(tmp_path: Path, trt):
    from mmexport.lint import lint_onnx

    path = _risky_model(tmp_path / "risky.onnx")
    findings = lint_onnx(path, "risky")
    by = {(f.code, f.node) for f in findings}
    flagged_errors = {f.node for f in findings if f.severity == "error" and f.code in ("unsupported-op", "custom-op")}
    assert flagged_errors == {"uniq", "custom", "bitand"}

    ok, errors = _rtx_parse(trt, path)
    assert not ok
    rejected = {name for name, _op, _code in errors}
    # Every node lint calls unsupported is really rejected, and the parser rejects nothing lint missed.
    assert flagged_errors == rejected

    assert ("data-dependent-shape", "nonzero") in by
    assert ("data-dependent-shape", "uniq") in by
    assert ("data-dependent-shape", "range_from_values") in by
    assert ("data-dependent-shape", "reshape_from_values") in by
    assert ("data-dependent-shape", "range_from_shape") not in by  # bounds from Shape: fine for TensorRT
    assert ("non-constant-input", "reduce_dyn_axes") in by
    assert ("dtype-double", "d") in by
    assert ("dtype-int64", "shape_in") in by
    assert any(f.code == "opset" and f.severity == "info" for f in findings)


def test_lint_subgraphs_functions_opset_and_missing_data(tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as TP
    from onnx import helper

    from mmexport.lint import lint_onnx

    then_g = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [],
                               [helper.make_tensor_value_info("t", TP.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="inner_relu")], "else", [],
                               [helper.make_tensor_value_info("e", TP.FLOAT, None)])
    fn = helper.make_function("local", "MyFn", ["a"], ["b"], [helper.make_node("Det", ["a"], ["b"], name="in_fn")],
                              [helper.make_opsetid("", 26)])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch"),
        helper.make_node("MyFn", ["x"], ["z"], domain="local", name="call_fn"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 2]), helper.make_tensor_value_info("cond", TP.BOOL, [])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None), helper.make_tensor_value_info("z", TP.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26), helper.make_opsetid("local", 1)],
                              functions=[fn])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    findings = lint_onnx(path, "g")
    codes = {(f.code, f.node) for f in findings}
    assert ("control-flow", "branch") in codes
    assert ("unsupported-op", "inner_unique") in codes  # inside the If body
    assert ("unsupported-op", "in_fn") in codes  # inside the model-local function
    assert not any(f.code == "custom-op" for f in findings)  # a local function is expanded, not a custom op
    assert any(f.code == "opset" and f.severity == "warning" and "26" in f.message for f in findings)

    # External data that is not where the graph says: an error before any parser runs.
    np = pytest.importorskip("numpy")
    from onnx import numpy_helper

    g2 = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g2",
                           [helper.make_tensor_value_info("x", TP.FLOAT, [4])],
                           [helper.make_tensor_value_info("y", TP.FLOAT, [4])],
                           [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 18)])
    p2 = tmp_path / "ext.onnx"
    onnx.save_model(m2, str(p2), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert any(f.code == "external-data" for f in lint_onnx(p2))
    (tmp_path / "ext.onnx.data").unlink()
    assert any(f.code == "missing-external-data" and f.severity == "error" for f in lint_onnx(p2))


def test_lint_profiles():
    from mmexport.lint import lint_profiles
    from mmexport.spec import ComponentSpec, Dim, TensorSpec

    def spec(past_max: int, total_max: int) -> ComponentSpec:
        return ComponentSpec(
            "dec",
            (TensorSpec("x", "float32", ("seq", 4)), TensorSpec("m", "int64", (1, "total")),
             TensorSpec("k", "float32", ("past", 4))),
            (TensorSpec("y", "float32", ("seq", 4)),),
            {"seq": Dim("seq", 1, 1, 8), "past": Dim("past", 0, 1, past_max),
             "total": Dim("total", 1, 2, total_max, derived=("past", "seq"))},
        )

    assert lint_profiles(spec(8, 16)) == []
    (f,) = lint_profiles(spec(8, 10))
    assert f.code == "profile-inconsistent" and f.severity == "warning" and "16" in f.message


def test_lint_tiny_artifact_and_every_graph_builds(tiny_artifact: Path, tmp_path: Path, trt):
    """The real exported graphs: lint finds no error, and the real TensorRT-RTX builder agrees by parsing and
    building an engine for every component."""
    from mmexport.engines import build_engine, resolve_flavor
    from mmexport.lint import has_errors, lint_artifacts, lint_report_json, render_lint
    from mmexport.runtime.manifest import load_manifest

    findings = lint_artifacts(tiny_artifact)
    assert not has_errors(findings), [f for f in findings if f.severity == "error"]
    assert {f.component for f in findings} == set(COMPONENTS)
    assert not any(f.code in ("unsupported-op", "custom-op", "unknown-op", "data-dependent-shape") for f in findings)
    for name in COMPONENTS:
        assert any(f.component == name and f.code == "external-data" for f in findings)

    report = lint_report_json(tiny_artifact, findings)
    assert json.loads(json.dumps(report)) == report
    assert report["ok"] is True and report["counts"]["error"] == 0
    assert report["counts"]["warning"] + report["counts"]["info"] == len(report["findings"])

    from rich.console import Console

    buf = io.StringIO()
    render_lint(findings, Console(file=buf, width=200), tiny_artifact)
    assert "0 error(s)" in buf.getvalue()

    m = load_manifest(tiny_artifact)
    rtx = resolve_flavor("tensorrt-rtx")
    for name in COMPONENTS:
        ok, errors = _rtx_parse(trt, m.component_file(name))
        assert ok, (name, errors)
        meta = build_engine(m.component_file(name), m.components[name], tmp_path / f"{name}.engine", rtx)
        assert meta["engine_bytes"] > 0


def test_lint_needs_a_manifest(tmp_path: Path):
    from mmexport.lint import lint_artifacts

    with pytest.raises(UserError, match="no manifest.json"):
        lint_artifacts(tmp_path)


# ---------------------------------------------------------------------------------------------- doctor


def test_doctor_reports_this_machine():
    from mmexport.doctor import doctor

    d = doctor()
    assert json.loads(json.dumps(d)) == d
    assert d["python"]["version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert d["platform"]["machine"]
    assert d["packages"]["numpy"]["installed"] and d["packages"]["numpy"]["version"]
    assert d["onnxruntime"]["installed"] and "CPUExecutionProvider" in d["onnxruntime"]["providers"]
    caps = d["capabilities"]
    assert set(caps) == {"can_export", "can_build_engines", "can_run_engines", "can_run_onnx"}
    assert all(isinstance(c["ok"], bool) and c["reason"] for c in caps.values())
    assert caps["can_run_onnx"]["ok"]

    rtx = d["tensorrt"]["tensorrt-rtx"]
    try:
        import tensorrt_rtx_bindings as t
    except ImportError:
        t = None
    if t is not None:
        assert rtx["installed"] and rtx["version"] == t.__version__
        assert caps["can_build_engines"]["ok"] and "without a GPU" in caps["can_build_engines"]["reason"]

    cuda = d["cuda"]
    if cuda["compute_capability"] is None:  # no GPU here (the usual CI machine)
        assert not caps["can_run_engines"]["ok"]
        assert "no usable NVIDIA GPU" in caps["can_run_engines"]["reason"]
        assert cuda["error"]
    else:
        assert cuda["device_name"] and cuda["driver_version"]


def test_doctor_does_not_import_torch():
    code = (
        "import sys\n"
        "from mmexport.doctor import doctor\n"
        "d = doctor()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'\n"
        "print(d['packages']['torch']['installed'])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr


def test_doctor_jetson_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mmexport import doctor as doc

    assert doc.parse_tegra_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64") == "36.4.3"
    assert doc.parse_tegra_release("garbage") is None
    rel, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    rel.write_text("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: x\n")
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(doc, "TEGRA_RELEASE", rel)
    monkeypatch.setattr(doc, "DEVICE_TREE_MODEL", model)
    assert doc._jetson() == {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t_release": "35.5.0"}
    monkeypatch.setattr(doc, "TEGRA_RELEASE", tmp_path / "absent")
    monkeypatch.setattr(doc, "DEVICE_TREE_MODEL", tmp_path / "absent")
    assert doc._jetson() is None


def test_render_doctor():
    from rich.console import Console

    from mmexport.doctor import doctor, render_doctor

    buf = io.StringIO()
    render_doctor(doctor(), Console(file=buf, width=200))
    text = buf.getvalue()
    for word in ("can_export", "can_build_engines", "can_run_engines", "onnxruntime", "tensorrt-rtx", "GPU"):
        assert word in text


def test_doctor_reads_the_cpus_int8_dot_products(tmp_path: Path):
    """The CPU line: model, cores and the int8 dot-product flags /proc/cpuinfo lists (x86 'flags', Arm 'Features')."""
    from mmexport.doctor import INT8_DOT_FLAGS, cpu_info, doctor

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\n"
                   "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_info(x86) == {"model": "AMD EPYC", "logical_cores": 2, "int8_dot_product": ["avx512_vnni"]}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n\nprocessor\t: 1\nFeatures\t: fp asimd asimddp\n")
    assert cpu_info(arm)["int8_dot_product"] == ["asimddp"] and cpu_info(arm)["logical_cores"] == 2
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nmodel name\t: Old\nflags\t\t: fpu sse avx2\n")
    assert cpu_info(old)["int8_dot_product"] == []
    assert cpu_info(tmp_path / "missing")["int8_dot_product"] == []
    # this machine: what /proc/cpuinfo says, if it is there
    cpu = doctor()["cpu"]
    info = Path("/proc/cpuinfo")
    if info.exists():
        flags = set(" ".join(line.split(":", 1)[1] for line in info.read_text().splitlines()
                             if line.lower().startswith(("flags", "features"))).split())
        assert cpu["int8_dot_product"] == [f for f in INT8_DOT_FLAGS if f in flags]
        assert cpu["logical_cores"] == sum(1 for line in info.read_text().splitlines() if line.startswith("processor"))
