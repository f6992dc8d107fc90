"""fp16 builds: weights in fp16, norms/softmax/rotary kept in fp32, verify within the recipe's fp16 bounds."""
from __future__ import annotations

import json

import onnx
from onnx import TensorProto, shape_inference

from conftest import run_cli
from mmexport.export.precision import FP32_OPS


def _elem_types(model):
    inferred = shape_inference.infer_shapes(model)
    types = {i.name: i.type.tensor_type.elem_type for i in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_fp16_build_keeps_fp32_islands_and_verifies(cache_dir, tmp_path):
    out = tmp_path / "fp16"
    run_cli("build", "qwen2-vl-tiny", "--precision", "fp16", "--out", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    for name, c in m["components"].items():
        model = onnx.load(str(out / c["file"]))
        # the interface is the declared one (fp32 in, fp32 out) at every precision
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == [
            TensorProto.FLOAT if t["dtype"] == "float32" else TensorProto.INT64 for t in c["spec"]["inputs"]]
        big = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 1024]
        assert big and all(i.data_type == TensorProto.FLOAT16 for i in big), name
        types = _elem_types(model)
        islands = [n for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization", "ReduceMean", "Cos", "Sin")]
        for n in islands:
            assert n.op_type in FP32_OPS
            assert types.get(n.input[0]) == TensorProto.FLOAT, f"{name}: {n.op_type} {n.name} not in fp32"
        if name in ("vision_encoder", "decoder"):
            assert any(n.op_type == "Softmax" for n in islands)
        # whole chains, not single ops: x^2, its mean, + eps and the sqrt of an RMSNorm, and the rotary
        # angles (cast of integer positions, times inverse frequencies) never pass through fp16
        producer = {o: n for n in model.graph.node for o in n.output}
        consumers = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for n in model.graph.node:
            if n.op_type == "ReduceMean" and producer[n.input[0]].op_type == "Pow":
                pw = producer[n.input[0]]
                assert types[pw.input[0]] == TensorProto.FLOAT and types[pw.output[0]] == TensorProto.FLOAT, f"{name}: x^2 in fp16"
                add = consumers[n.output[0]][0]
                sqrt = consumers[add.output[0]][0]
                assert (add.op_type, sqrt.op_type) == ("Add", "Sqrt")
                for m_ in (n, add, sqrt):
                    assert all(types.get(i) != TensorProto.FLOAT16 for i in [*m_.input, *m_.output] if i), f"{name}: {m_.name} in fp16"
            if n.op_type in ("Cos", "Sin"):
                angle = producer[n.input[0]]
                assert all(types.get(i) != TensorProto.FLOAT16 for i in angle.input if i), f"{name}: rotary angles in fp16"
    rep = json.loads(run_cli("verify", out, "--json").stdout)
    assert rep["passed"], rep["failures"]
    tol = rep["tolerance"]
    assert tol["component_max_abs"] > 1e-4  # the recipe's fp16 bounds, not fp32's
    worst = max(c["max_abs"] for c in rep["comparisons"] if c["name"] in ("vision_encoder", "projector"))
    assert worst > 1e-5  # really computed in fp16 (fp32 graphs are ~1e-5 or better)
    # the fp16 graphs (with their fp32 islands) are accepted by a strongly typed TensorRT build
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        return
    meta = json.loads(run_cli("engines", out, "--json").stdout)
    assert set(meta["components"]) == set(m["components"]) and all(c["engine_bytes"] > 0 for c in meta["components"].values())


def test_int8_build_verifies_against_its_gate_and_int4_needs_a_stated_gate(cache_dir, tmp_path):
    out = tmp_path / "int8"
    run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--quant-block-size", "64", "--out", out)
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["scheme"] == "int8" and q["bits"] == 8 and set(q["components"]) == {"decoder"}
    assert q["components"]["decoder"]["quantized_matmuls"] > 0
    assert q["block_size"] == 64 and q["components"]["decoder"]["block_size"] == 64
    nbits = [n for n in onnx.load(str(out / "onnx" / "decoder.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert nbits and all(onnx.helper.get_attribute_value(a) == 64 for n in nbits for a in n.attribute if a.name == "block_size")
    rep = json.loads(run_cli("verify", out, "--json").stdout)
    assert rep["passed"], rep["failures"]
    assert rep["precision"] == "fp32+int8"
    by = {(c["case"], c["name"]): c for c in rep["comparisons"]}
    # the decoder is quantized (int8 bounds), the vision tower is not (fp32 bounds still apply)
    assert by[("images", "decoder")]["tol_abs"] == 0.2 and by[("images", "decoder")]["max_abs"] > 1e-4
    assert by[("images[0]", "vision_encoder")]["tol_abs"] == 1e-4
    greedy = [c for c in rep["checks"] if c["name"].startswith("greedy")]
    assert all(c["passed"] for c in greedy)
    p = run_cli("engines", out, check=2)
    assert "MatMulNBits" in p.stderr
    p = run_cli("build", "qwen2-vl-tiny", "--quantize", "int4", "--out", tmp_path / "int4", check=2)
    assert "[tolerances.int4]" in p.stderr and not (tmp_path / "int4").exists()
    # a quantized vision tower needs a gate of its own; --quantize-vision needs --quantize
    p = run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--quantize-vision", "--out", tmp_path / "v", check=2)
    assert "[tolerances.int8_vision]" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-tiny", "--quantize-vision", "--out", tmp_path / "v", check=2)
    assert "--quantize-vision goes with --quantize" in p.stderr and not (tmp_path / "v").exists()
    # dynamic quantization is 8-bit, of an fp32 build, and needs --quantize
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int4", "--quant-method", "dynamic", "--out", tmp_path / "v", check=2)
    assert "dynamic quantization is 8-bit" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-shapes", "--quant-method", "dynamic", "--out", tmp_path / "v", check=2)
    assert "--quant-method goes with --quantize" in p.stderr
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int8", "--quant-method", "dynamic", "--precision", "fp16",
                "--out", tmp_path / "v", check=2)
    assert "dynamic quantization takes an fp32 build" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int8", "--quant-method", "gptq", "--out", tmp_path / "v", check=2)
    assert "blockwise, dynamic" in p.stderr
    # blocks: a power of two >= 16, of blockwise quantization only
    for bad in ("48", "8"):
        p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int4", "--quant-block-size", bad, "--out", tmp_path / "v", check=2)
        assert "power of two, at least 16" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int8", "--quant-method", "dynamic", "--quant-block-size", "64",
                "--out", tmp_path / "v", check=2)
    assert "per channel, without blocks" in p.stderr
    p = run_cli("build", "qwen2-vl-shapes", "--quant-block-size", "64", "--out", tmp_path / "v", check=2)
    assert "--quant-block-size goes with --quantize" in p.stderr
    # the vision tower's own method: with --quantize-vision; dynamic is int8 and takes an fp32 build
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int4", "--vision-quant-method", "dynamic", "--out", tmp_path / "v", check=2)
    assert "--vision-quant-method goes with --quantize-vision" in p.stderr
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int4", "--quantize-vision", "--vision-quant-method", "dynamic",
                "--precision", "fp16", "--out", tmp_path / "v", check=2)
    assert "dynamic quantization takes an fp32 build" in p.stderr
    p = run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--quantize-vision", "--vision-quant-method", "gptq", "--out", tmp_path / "v", check=2)
    assert "vision quantization method must be one of blockwise, dynamic" in p.stderr and not (tmp_path / "v").exists()
    # a prefill graph: dynamic, beside a blockwise decoder of an fp32 build
    p = run_cli("build", "qwen2-vl-tiny", "--prefill-quant-method", "dynamic", "--out", tmp_path / "v", check=2)
    assert "--prefill-quant-method goes with --quantize" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--prefill-quant-method", "blockwise", "--out", tmp_path / "v", check=2)
    assert "prefill quantization method must be dynamic" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-shapes", "--quantize", "int8", "--quant-method", "dynamic", "--prefill-quant-method", "dynamic",
                "--out", tmp_path / "v", check=2)
    assert "already prefills with integer GEMMs" in p.stderr and not (tmp_path / "v").exists()
    p = run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--prefill-quant-method", "dynamic", "--precision", "fp16",
                "--out", tmp_path / "v", check=2)
    assert "dynamic quantization takes an fp32 build" in p.stderr and not (tmp_path / "v").exists()


def test_prefill_graph_runs_prompts_and_the_blockwise_graph_decodes(cache_dir, tmp_path):
    """--prefill-quant-method dynamic: the decoder gets a second graph of the same declaration (integer GEMMs), hashed
    like the first; the runtime runs each prompt through it and every decode step through the block-wise graph."""
    import numpy as np

    from mmexport.runtime.backends import PhasedRunner
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.verify import default_images

    out = tmp_path / "pf"
    run_cli("build", "qwen2-vl-tiny", "--quantize", "int8", "--prefill-quant-method", "dynamic", "--out", out)
    m = json.loads((out / "manifest.json").read_text())
    dec, pre = m["components"]["decoder"], m["components"]["decoder"]["prefill"]

    def ops(rel):
        return {n.op_type for n in onnx.load(str(out / rel), load_external_data=False).graph.node}

    assert "MatMulInteger" in ops(pre["file"]) and "MatMulNBits" not in ops(pre["file"])
    assert "MatMulNBits" in ops(dec["file"]) and "MatMulInteger" not in ops(dec["file"])
    assert pre["file"] in m["files"] and pre["data_files"] and all(f in m["files"] for f in pre["data_files"])
    assert m["quantization"]["prefill_method"] == "dynamic" and m["quantization"]["components"]["decoder_prefill"]["bits"] == 8

    pipe = Pipeline(out)
    try:
        runner = pipe.runners["decoder"]
        assert isinstance(runner, PhasedRunner)
        res = pipe.generate("Describe the image.", default_images()[:1], max_new_tokens=6, ignore_eos=True)
        assert len(res.token_ids) == 6 and res.calls["decoder"] == 6
        assert runner.prefill.calls == 1 and runner.decode.calls == 5
        # one prompt through each graph: the same logits within int8 error
        prep = pipe.prepare("Describe the image.", default_images()[:1])
        state = pipe.encode_images(prep.images)
        via_prefill = pipe.prefill(prep, state, pipe.new_cache())
        runner.runner_for = lambda feed: runner.decode
        via_blockwise = pipe.prefill(prep, state, pipe.new_cache())
        assert runner.prefill.calls == 2 and runner.decode.calls == 6
        a, b = np.ravel(via_prefill).astype(np.float64), np.ravel(via_blockwise).astype(np.float64)
        assert 0 < np.abs(a - b).max() and np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    finally:
        pipe.close()
    # the prefill graph is one of the hashed files: an edited one is refused before anything runs
    g = out / pre["file"]
    g.chmod(0o644)
    g.write_bytes(g.read_bytes() + b"\0")
    p = run_cli("run", out, "--prompt", "hi", check=2)
    assert pre["file"] in p.stderr and "sha256" in p.stderr
