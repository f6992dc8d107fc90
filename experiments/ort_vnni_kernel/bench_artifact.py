"""An artifact's decoder with its 4-bit MatMulNBits nodes replaced by mmexport.MatMulNBitsVnni, benched against the
original in one `mmexport bench A B` (runs alternated).

    python bench_artifact.py LIB.so ARTIFACT COPY_DIR [bench options...]

COPY_DIR receives a copy of ARTIFACT whose onnx/decoder.onnx is rewritten (the weights file is the same bytes)
and whose manifest is re-hashed. The library is registered in every ONNX Runtime session of this process by
wrapping mmexport's session options, so the runtime itself is unchanged.
"""
import json
import shutil
import sys
from pathlib import Path

import onnx
from onnx import helper

from mmexport.artifact.files import sha256_file
from mmexport.runtime import backends
from mmexport.runtime.manifest import write_manifest


def rewrite(src: Path, dst: Path) -> int:
    if dst.exists():
        raise SystemExit(f"{dst} exists; give a new directory")
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    rel = manifest["components"]["decoder"]["file"]
    model = onnx.load(str(dst / rel), load_external_data=False)
    done = 0
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or n.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input) + [""] * (6 - len(n.input))
        K, bs = attrs["K"], attrs["block_size"]
        if attrs.get("bits", 4) != 4 or ins[3] or ins[4] or K % 64 or bs % 32:
            continue
        n.op_type, n.domain = "MatMulNBitsVnni", "mmexport"
        del n.input[:]
        n.input.extend(ins[:3] + ([ins[5]] if ins[5] else []))
        del n.attribute[:]
        n.attribute.extend(helper.make_attribute(k, attrs[k]) for k in ("K", "N", "bits", "block_size"))
        done += 1
    model.opset_import.append(helper.make_opsetid("mmexport", 1))
    onnx.save(model, str(dst / rel))
    manifest["components"]["decoder"]["sha256"] = sha256_file(dst / rel)
    write_manifest(dst, manifest)
    return done


def main():
    lib, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    print(f"{rewrite(src, dst)} MatMulNBits nodes rewritten in {dst}", file=sys.stderr)
    plain = backends.ort_session_options

    def with_kernel(*a, **kw):
        so = plain(*a, **kw)
        so.register_custom_ops_library(lib)
        return so

    backends.ort_session_options = with_kernel
    from mmexport.cli import main as cli

    sys.argv = ["mmexport", "bench", str(src), str(dst), *sys.argv[4:]]
    cli()


if __name__ == "__main__":
    main()
