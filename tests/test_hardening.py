"""Issue 15, tried as a hostile or careless user would: every class of failure, with real files and
processes (symbolic links, FIFOs, devices, read-only directories with the permission bypass dropped,
a small tmpfs, SIGKILL and SIGTERM mid-build, concurrent builds, closed and full stdout).

Each test names the class it proves; the mechanisms live in mmexport/artifact/ (paths, files,
destination, onnx_refs), runtime/manifest_schema.py, export/preflight.py and cli.main.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

NOBODY = 65534


# -- helpers ------------------------------------------------------------------------------------------
def cli(*args, cwd=None, env=None, user=None, timeout=300, stdout=subprocess.PIPE, **kw) -> subprocess.CompletedProcess:
    """The real command in a subprocess; `user=NOBODY` drops root (and with it the permission bypass)."""
    e = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "mmexport", *map(os.fspath, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=e, cwd=cwd or REPO, timeout=timeout, **kw)


def one_line(p: subprocess.CompletedProcess, code: int = 2, *needles: str) -> str:
    """The promise: exit `code`, exactly one line on stderr, starting with `error:`, no traceback."""
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert p.returncode == code, f"exit {p.returncode} != {code}\nstderr:\n{p.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_artifact(src: Path, dst: Path) -> Path:
    """A private copy of a build (without what other tests of the session added: verify.json, engines/)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("verify.json", "engines"))
    return dst


def edit_manifest(art: Path, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def rehash(art: Path) -> None:
    """What an attacker does after tampering: make every recorded sha256 consistent again."""
    def fix(m):
        m["files"] = {rel: sha(art / rel) for rel in m["files"]}
        for c in m["components"].values():
            c["sha256"] = m["files"][c["file"]]
    edit_manifest(art, fix)


@pytest.fixture
def world_dir():
    """A directory the unprivileged user may enter (pytest's own tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="mmexport-hardening-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def can_drop_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root to switch to an unprivileged user (as a non-root user the permission tests are plain runs)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", "import mmexport"],
                           capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return None if probe.returncode == 0 else f"the unprivileged user cannot run this Python ({probe.stderr.decode()[-200:]})"


@contextmanager
def mounted(kind: str, target: Path, source: Path | None = None, size: str = "1m"):
    """A real tmpfs of `size`, or a read-only bind mount of `source`; skips where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
    else:
        cmds = [["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]]
    for i, c in enumerate(cmds):
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            if i:
                subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip(f"cannot mount here ({' '.join(c[:3])}: {r.stderr.strip()[:120]})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def wait_for(pred, timeout: float = 120, what: str = "") -> None:
    t = time.monotonic()
    while not pred():
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.building-*"))


def start_build(out: Path, *extra: str) -> subprocess.Popen:
    e = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    # as from a terminal: where the tests themselves run as a background job, SIGINT is ignored and a child
    # inherits that, and a build started so is not one Ctrl-C can reach (mmexport leaves it ignored)
    return subprocess.Popen([sys.executable, "-m", "mmexport", "build", "qwen2-vl-tiny", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# == Data loss =============================================================================================
def test_force_never_replaces_cwd_ancestors_home_root_links_files_or_foreign_dirs(cache_dir, tmp_path):
    """--force may replace only an artifact or an empty directory; everything else is one line, exit 2,
    and the user's files are still there."""
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    (tmp_path / "project" / "keep.txt").write_text("precious")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("precious")
    (tmp_path / "link").symlink_to(foreign)
    (tmp_path / "afile").write_text("precious")

    env = {"HOME": str(home)}
    one_line(cli("build", "qwen2-vl-tiny", "--out", ".", "--force", cwd=work, env=env), 2, "working directory")
    one_line(cli("build", "qwen2-vl-tiny", "--out", "..", "--force", cwd=work, env=env), 2, "contains the working directory")
    one_line(cli("build", "qwen2-vl-tiny", "--out", home, "--force", cwd=work, env=env), 2, "home directory")
    one_line(cli("build", "qwen2-vl-tiny", "--out", "/", "--force", cwd=work, env=env), 2, "root directory")
    one_line(cli("build", "qwen2-vl-tiny", "--out", foreign, "--force", env=env), 2, "not an mmexport artifact")
    one_line(cli("build", "qwen2-vl-tiny", "--out", tmp_path / "link", "--force", env=env), 2, "symbolic link")
    one_line(cli("build", "qwen2-vl-tiny", "--out", tmp_path / "afile", "--force", env=env), 2, "not a directory")
    for f in (work / "notes.txt", tmp_path / "project" / "keep.txt", home / "thesis.tex", foreign / "data.csv", tmp_path / "afile"):
        assert f.read_text() == "precious", f
    assert not list(tmp_path.rglob(".*.lock")) and not list(tmp_path.rglob(".*.building-*"))


def test_force_replaces_an_artifact_but_not_one_holding_user_files(tiny_artifacts, tmp_path):
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    (art / "onnx" / "my-notes.txt").write_text("precious")
    one_line(cli("build", "qwen2-vl-tiny", "--out", art, "--force"), 2, "onnx/my-notes.txt", "not part of its artifact")
    assert (art / "onnx" / "my-notes.txt").read_text() == "precious"
    (art / "onnx" / "my-notes.txt").unlink()
    (art / "verify.json").write_text("{}")  # mmexport's own files are part of the artifact
    (art / "engines" / "tensorrt-rtx-1.0").mkdir(parents=True)
    (art / "engines" / "tensorrt-rtx-1.0" / "decoder.engine").write_bytes(b"engine")
    old = json.loads((art / "manifest.json").read_text())["created"]
    time.sleep(1.1)
    p = cli("build", "qwen2-vl-tiny", "--out", art, "--force", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads((art / "manifest.json").read_text())["created"] != old
    assert not (art / "verify.json").exists() and not (art / "engines").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]  # no lock, staging or replaced directory left


def test_concurrent_builds_to_one_destination_the_second_fails_with_one_line(cache_dir, tmp_path):
    out = tmp_path / "out"
    first = start_build(out)
    try:
        wait_for(lambda: staging_dirs(out) or first.poll() is not None, what="the first build's staging directory")
        assert first.poll() is None, first.communicate()
        second = cli("build", "qwen2-vl-tiny", "--out", out, "--force")
        one_line(second, 2, "another mmexport build is writing", f"pid {first.pid}")
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert json.loads((out / "manifest.json").read_text())["recipe"]["name"] == "qwen2-vl-tiny"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # the lock file is removed at the end


def test_sigkill_mid_build_leaves_nothing_complete_and_the_next_build_removes_the_stale_dir(cache_dir, tmp_path):
    from mmexport.artifact.destination import owner_tag

    out = tmp_path / "out"
    p = start_build(out)
    wait_for(lambda: staging_dirs(out) or p.poll() is not None, what="the staging directory")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    stale = staging_dirs(out)
    assert len(stale) == 1 and not out.exists()  # nothing that looks complete

    # a staging dir whose pid is alive but whose start time differs (pid reused): stale as well;
    # one that this very process owns: alive, left alone
    boot, pid, start = owner_tag().split("-")
    reused = tmp_path / f".out.building-{boot}-{pid}-{int(start) + 1}-0badc0de"
    mine = tmp_path / f".out.building-{owner_tag()}-600dc0de"
    reused.mkdir()
    mine.mkdir()
    # the next build to that destination cleans up first (here it then stops at a bad --model, in a second)
    nxt = cli("build", "qwen2-vl-tiny", "--out", out, "--model", tmp_path / "no-such-checkpoint")
    assert nxt.returncode == 2 and "no such directory" in nxt.stderr and "Traceback" not in nxt.stderr
    assert "left by a build that was killed" in nxt.stderr
    assert staging_dirs(out) == [mine]
    assert not out.exists() and not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_stop_signal_mid_build_cleans_up_at_once(cache_dir, tmp_path, sig, code, word):
    out = tmp_path / "out"
    p = start_build(out)
    wait_for(lambda: staging_dirs(out) or p.poll() is not None, what="the staging directory")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and word in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_library_code_is_deferred_to_its_end_and_a_second_one_is_not():
    """torch's ONNX exporter swallows an exception raised through it (and has crashed on one): a SIGTERM (or Ctrl-C)
    inside deferred_termination() waits for the block to end; a second one raises at once; one swallowed still
    counts."""
    script = r"""
import os, signal, sys, time
from mmexport.errors import Terminated, check_terminated, deferred_termination, on_stop_signal
SIG, EXC = (signal.SIGINT, KeyboardInterrupt) if sys.argv[1] == "int" else (signal.SIGTERM, Terminated)
signal.signal(SIG, on_stop_signal)
steps = []
for inside, after in (("finished the block", "terminated after it"), ("not here", "second: at once")):
    try:
        with deferred_termination():
            os.kill(os.getpid(), SIG)
            time.sleep(0.2)
            steps.append(inside)
    except EXC:
        steps.append(after)
try:
    check_terminated()
except EXC:
    steps.append("checked")
print(",".join(steps))
"""
    for sig in ("term", "int"):
        p = subprocess.run([sys.executable, "-c", script, sig], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout.strip() == "finished the block,terminated after it,second: at once,checked", (sig, p.stderr)


# == Integrity and path safety ==============================================================================
@pytest.mark.parametrize("case", ["dotdot", "absolute", "not-normalized", "symlink-out", "unhashed-component", "unhashed-template",
                                  "no-files"])
def test_manifest_paths_stay_inside_and_every_loaded_file_is_hashed(tiny_artifacts, tmp_path, case):
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    outside = tmp_path / "outside.json"
    shutil.copy(art / "tokenizer" / "tokenizer.json", outside)
    if case == "dotdot":
        edit_manifest(art, lambda m: m["tokenizer"].update(file="../outside.json"))
        need = "leaves the artifact directory"
    elif case == "absolute":
        edit_manifest(art, lambda m: m["files"].update({str(outside): sha(outside)}))
        need = "absolute path"
    elif case == "not-normalized":
        edit_manifest(art, lambda m: m["components"]["decoder"].update(file="onnx/./decoder.onnx"))
        need = "not normalized"
    elif case == "symlink-out":  # the attacker keeps the hash right: only the link gives it away
        (art / "tokenizer" / "tokenizer.json").unlink()
        (art / "tokenizer" / "tokenizer.json").symlink_to(outside)
        need = "leads outside the artifact directory"
    elif case == "unhashed-component":
        edit_manifest(art, lambda m: m["files"].pop("onnx/decoder.onnx.data"))
        need = "components.decoder.data_files[0]: onnx/decoder.onnx.data is not in the hashed file list"
    elif case == "unhashed-template":
        edit_manifest(art, lambda m: m["files"].pop("tokenizer/chat_template.jinja"))
        need = "tokenizer.chat_template"
    else:
        edit_manifest(art, lambda m: m.pop("files"))
        need = "files: missing"
    one_line(cli("run", art, "--prompt", "hi"), 2, need)
    one_line(cli("inspect", art), 2, need)  # even without the hash check


def test_onnx_external_data_cannot_point_outside(tiny_artifacts, tmp_path):
    """A graph whose tensor reads its data from outside the artifact (the hashes made consistent, as an
    attacker would) is refused before ONNX Runtime sees it. The target is a FIFO: had anything opened
    it for reading, the run would hang instead of exiting."""
    import onnx

    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    os.mkfifo(tmp_path / "secret")
    g = onnx.load(str(art / "onnx" / "decoder.onnx"), load_external_data=False)
    t = next(t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(kv for kv in t.external_data if kv.key == "location").value = "../../secret"
    onnx.save(g, str(art / "onnx" / "decoder.onnx"))
    rehash(art)
    one_line(cli("run", art, "--prompt", "hi", timeout=60), 2, "external data of tensor", "'..'")
    next(kv for kv in t.external_data if kv.key == "location").value = "projector.onnx.data"  # inside, but another component's
    onnx.save(g, str(art / "onnx" / "decoder.onnx"))
    rehash(art)
    one_line(cli("run", art, "--prompt", "hi", timeout=60), 2, "projector.onnx.data", "not one of the component's hashed data files")


def test_engine_paths_in_engines_json_stay_inside(tmp_path):
    from mmexport.errors import UserError
    from mmexport.runtime.trt import EngineChoice

    d = tmp_path / "art" / "engines" / "tensorrt-rtx-1.0"
    d.mkdir(parents=True)
    (d / "decoder.engine").write_bytes(b"engine")
    (tmp_path / "secret.engine").write_bytes(b"not yours")
    (d / "link.engine").symlink_to(tmp_path / "secret.engine")
    choice = lambda rel: EngineChoice(None, d, {"components": {"decoder": {"engine": rel}}}, "decoder")
    assert choice("decoder.engine").engine_path.read_bytes() == b"engine"
    for rel, need in (("../../../secret.engine", "'..'"), (str(tmp_path / "secret.engine"), "absolute path"),
                      ("link.engine", "leads outside"), (None, "expected a relative path")):
        with pytest.raises(UserError, match=need.replace("(", r"\(")) as e:
            choice(rel).engine_path
        assert "components.decoder.engine" in str(e.value)


def test_onnx_scanner_finds_every_external_reference_onnx_finds(tmp_path):
    """The protobuf-free scan against the onnx package's own traversal, on a model with external data in
    initializers, a Constant's attribute tensor, an If's subgraphs, a sparse initializer and a function."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmexport.artifact.onnx_refs import OnnxScanError, external_data_refs
    from mmexport.artifact.engines import external_data_files

    def ext(name: str, loc: str) -> TensorProto:
        t = numpy_helper.from_array(np.ones((2, 2), np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=loc)
        t.external_data.add(key="offset", value="0")
        return t

    then_g = helper.make_graph([helper.make_node("Constant", [], ["y"], value=ext("c_then", "then.bin"))], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "else", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[ext("w", "else.bin")])
    sparse = helper.make_sparse_tensor(ext("sv", "sparse.bin"), numpy_helper.from_array(np.array([0], np.int64), "si"), [4])
    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Constant", [], ["b"], value=ext("fc", "func.bin"))],
                              [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[ext("init", "weights.bin")], sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    locs = sorted({loc for _, loc in external_data_refs(path)})
    assert locs == ["else.bin", "func.bin", "sparse.bin", "then.bin", "weights.bin"]
    assert set(external_data_files(path)) <= set(locs)  # onnx's traversal (engines) finds no more than the scan
    path.write_bytes(path.read_bytes()[:-7])  # truncated: an error, never a partial answer
    with pytest.raises(OnnxScanError):
        external_data_refs(path)


def test_nothing_is_written_through_a_symlink(tiny_artifacts, tmp_path):
    """.verified.json and verify.json planted as links to the user's files: the files stay untouched, the
    links are replaced by mmexport's own files (exclusive temporary file + rename)."""
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    victim1, victim2 = tmp_path / "victim1.txt", tmp_path / "victim2.txt"
    victim1.write_text("precious 1")
    victim2.write_text("precious 2")
    (art / ".verified.json").unlink()
    (art / ".verified.json").symlink_to(victim1)
    (art / "verify.json").symlink_to(victim2)
    assert cli("run", art, "--prompt", "hi", "--max-new-tokens", "2").returncode == 0  # a copy: hashes, then records them
    p = cli("verify", art, "--json", "--tokens", "2", "--task", "none")
    assert p.returncode == 0, p.stderr
    assert victim1.read_text() == "precious 1" and victim2.read_text() == "precious 2"
    assert not (art / ".verified.json").is_symlink() and not (art / "verify.json").is_symlink()
    assert json.loads((art / "verify.json").read_text())["passed"] is True
    assert len(json.loads((art / ".verified.json").read_text())) == len(json.loads((art / "manifest.json").read_text())["files"])
    assert not [p for p in art.rglob("*.tmp")]

    from mmexport.artifact.engines import write_bytes_atomic  # engines and engines.json take the same road

    (art / "engines").mkdir()
    (art / "engines" / "x.engine").symlink_to(victim1)
    write_bytes_atomic(art / "engines" / "x.engine", b"engine bytes")
    assert victim1.read_text() == "precious 1" and (art / "engines" / "x.engine").read_bytes() == b"engine bytes"


def test_stat_record_is_keyed_on_ctime_and_rehash_reads_everything(tiny_artifacts, tmp_path):
    """An in-place edit with the old mtime restored is hashed (ctime moved); what the record cannot see --
    content changed under an unchanged stat, as silent disk corruption does (simulated: the record forged
    to vouch for the edited file) -- `run --rehash` still catches."""
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    assert cli("run", art, "--prompt", "hi", "--max-new-tokens", "1").returncode == 0  # records the copy's stats
    data = art / "onnx" / "projector.onnx.data"
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF
    with open(data, "r+b") as f:
        f.write(raw)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    one_line(cli("run", art, "--prompt", "hi"), 2, "projector.onnx.data does not match its sha256")

    rec = json.loads((art / ".verified.json").read_text())
    s2 = data.stat()
    rec["onnx/projector.onnx.data"] = {"stat": [s2.st_size, s2.st_mtime_ns, s2.st_ctime_ns, s2.st_ino, s2.st_dev],
                                       "sha256": json.loads((art / "manifest.json").read_text())["files"]["onnx/projector.onnx.data"]}
    (art / ".verified.json").write_text(json.dumps(rec))
    assert cli("run", art, "--prompt", "hi", "--max-new-tokens", "1").returncode == 0  # the record vouches for it
    one_line(cli("run", art, "--prompt", "hi", "--rehash"), 2, "projector.onnx.data does not match its sha256")


@pytest.mark.parametrize("change, need", [
    (lambda s: s["inputs"][1].update(dtype="int32"), "graph input position_ids is int64"),
    (lambda s: s["inputs"][1].update(shape=["batch", "seq_len"]), "graph input position_ids is int64 [3"),
    (lambda s: s["outputs"][0].update(name="scores"), "outputs differ from its declaration"),
])
def test_graph_io_must_match_the_declaration_when_the_session_is_created(tiny_artifacts, tmp_path, change, need):
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    edit_manifest(art, lambda m: change(m["components"]["decoder"]["spec"]))
    one_line(cli("run", art, "--prompt", "hi"), 2, "component decoder", need)


@pytest.mark.parametrize("change, need", [
    (lambda m: m.update(schema_version="1"), "schema_version: expected an integer, got '1'"),
    (lambda m: m.update(schema_version=2), "schema version 2, this mmexport reads 1"),
    (lambda m: m.update(schema_version=True), "schema_version: expected an integer"),
    (lambda m: m["limits"].update(max_context="512"), "limits.max_context: expected an integer >= 1"),
    (lambda m: m["components"]["decoder"].update(sha256="abc"), "components.decoder.sha256: expected a sha256"),
    (lambda m: m.pop("tokenizer"), "tokenizer: missing"),
    (lambda m: m["components"]["projector"]["spec"]["inputs"][0].update(dtype="float8"), "components.projector.spec.inputs[0].dtype"),
    (lambda m: m["components"]["decoder"]["spec"]["dims"]["seq_len"].update(min=9, max=3), "components.decoder.spec: dim seq_len"),
    (lambda m: m["tokenizer"].update(eos_token_ids="7"), "tokenizer.eos_token_ids: expected a list"),
    (lambda m: m.update(model=[]), "model: expected an object"),
])
def test_manifest_is_validated_as_a_whole(tiny_artifacts, tmp_path, change, need):
    from mmexport.errors import UserError
    from mmexport.runtime.manifest import load_manifest

    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    edit_manifest(art, change)
    with pytest.raises(UserError) as e:
        load_manifest(art, check_files=False)
    assert need in str(e.value) and "\n" not in str(e.value)


def test_manifest_schema_error_through_the_cli_and_a_bad_model_section(tiny_artifacts, tmp_path):
    art0 = copy_artifact(tiny_artifacts, tmp_path / "art0")
    edit_manifest(art0, lambda m: m["components"].pop("decoder"))
    one_line(cli("run", art0, "--prompt", "hi"), 2, "components: no decoder")
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    edit_manifest(art, lambda m: m.update(schema_version="1"))
    one_line(cli("inspect", art), 2, "manifest.json: schema_version: expected an integer")
    art2 = copy_artifact(tiny_artifacts, tmp_path / "art2")
    edit_manifest(art2, lambda m: m["model"].pop("vision"))
    one_line(cli("run", art2, "--prompt", "hi"), 2, "manifest.json: model: the qwen2_vl runtime cannot use it")


# == Inputs ==================================================================================================
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_transformers_does(tmp_path, orientation):
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from mmexport.runtime.image import load_image

    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    ours, ref = load_image(path), hf_load_image(str(path))
    assert ours.size == ref.size == ((50, 30) if orientation < 5 else (30, 50))
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(ref))


def test_a_sideways_phone_photo_reaches_the_model_upright(tiny_artifacts, tmp_path):
    from PIL import Image

    from mmexport.runtime.pipeline import Pipeline

    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 90, 3), dtype=np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 90x180 ...
    exif = stored.getexif()
    exif[0x0112] = 6  # ... and "rotate 90 degrees clockwise to view"
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    upright.save(tmp_path / "upright.png")
    pipe = Pipeline(tiny_artifacts)
    a = pipe.prepare("Describe.", [tmp_path / "phone.jpg"]).images[0]
    b = pipe.prepare("Describe.", [tmp_path / "upright.png"]).images[0]
    assert a.grid_thw == b.grid_thw and a.grid_thw[1] > a.grid_thw[2]  # portrait, as the user sees it
    pipe.close()


def test_non_regular_image_files_are_refused_without_blocking(tiny_artifacts, tmp_path):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)  # no writer: opening it for reading blocks, reading it would wait forever
    one_line(cli("run", tiny_artifacts, "--image", fifo, "--prompt", "x", timeout=60), 2, "not an image file", "FIFO")
    one_line(cli("run", tiny_artifacts, "--image", "/dev/zero", "--prompt", "x", timeout=60), 2, "not an image file", "character device")
    one_line(cli("run", tiny_artifacts, "--image", tmp_path, "--prompt", "x", timeout=60), 2, "not an image file", "directory")


def test_images_outside_the_vision_profile_are_refused_in_pixels(tiny_artifacts, tmp_path):
    """The tiny build's vision encoder takes 16..256 patches (3136..50176 pixels). A 2000x28 strip
    (71:1, which Qwen2-VL's processor accepts: it only refuses > 200:1) resizes to 268 patches: refused
    with what the build accepts; a 1790x28 strip (64:1) fits and runs; tiny images are upscaled as
    transformers does and run."""
    from PIL import Image

    for w, h in ((2000, 28), (1790, 28), (1, 1), (3, 13), (6000, 28)):
        Image.new("RGB", (w, h), (200, 30, 30)).save(tmp_path / f"{w}x{h}.png")
    line = one_line(cli("run", tiny_artifacts, "--image", tmp_path / "2000x28.png", "--prompt", "x"), 2,
                    "2000x28 pixels", "3136 to 50176 pixels", "aspect ratios up to 64:1")
    assert "num_patches" not in line and "dim" not in line
    one_line(cli("run", tiny_artifacts, "--image", tmp_path / "6000x28.png", "--prompt", "x"), 2, "at most 200:1")
    for ok in ("1790x28", "1x1", "3x13"):
        p = cli("run", tiny_artifacts, "--image", tmp_path / f"{ok}.png", "--prompt", "x", "--max-new-tokens", "1")
        assert p.returncode == 0, (ok, p.stderr)


@pytest.mark.parametrize("args, need", [
    (("--temperature", "1e-320"), "temperature must be 0 (greedy) or a finite number >= 0.001"),
    (("--temperature", "1e-5"), "temperature must be 0"),
    (("--temperature", "inf"), "temperature must be 0"),
    (("--temperature", "-1"), "--temperature"),
    (("--seed", "-1"), "seed must be an integer from 0"),
    (("--top-p", "2"), "--top-p"),
    (("--top-p", "nan"), "--top-p"),
    (("--top-k", "-3"), "--top-k"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--max-new-tokens", "many"), "--max-new-tokens"),
    (("--bogus",), "No such option: --bogus"),
    (("--prompt", os.fsdecode(b"caf\xe9 \xff")), "not valid UTF-8 text (byte 0xe9"),
    (("--stop", os.fsdecode(b"\xc3(")), "'--stop': not valid UTF-8"),
])
def test_out_of_range_options_and_bad_text_are_one_line(tiny_artifacts, args, need):
    base = ["run", tiny_artifacts] + ([] if "--prompt" in args else ["--prompt", "hi"])
    one_line(cli(*base, *args), 2, need)


def test_usage_errors_from_click_are_one_line_too(cache_dir):
    one_line(cli("run"), 2, "Missing argument")
    one_line(cli("no-such-command"), 2, "No such command")
    one_line(cli("bench", "x", "--repeat", "0"), 2, "--repeat")


def test_invalid_utf8_in_files_is_one_line(tiny_artifacts, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b'name = "caf\xe9"\nfamily = "qwen2_vl"\n')
    one_line(cli("build", recipe, "--out", tmp_path / "o"), 2, "r.toml: not valid UTF-8 (byte 0xe9")
    art = copy_artifact(tiny_artifacts, tmp_path / "art")
    (art / "tokenizer" / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    rehash(art)
    one_line(cli("run", art, "--prompt", "hi"), 2, "chat_template.jinja: not valid UTF-8 (byte 0xff")


def _checkpoint_variant(tiny_checkpoint: Path, tmp_path: Path, case: str) -> Path:
    ck = tmp_path / case
    shutil.copytree(tiny_checkpoint, ck)
    w = ck / "model.safetensors"
    if case == "no-weights":
        w.unlink()
    elif case == "truncated":
        w.write_bytes(w.read_bytes()[:-1000])
    elif case == "corrupt-header":
        raw = bytearray(w.read_bytes())
        raw[8:20] = b"not json at "
        w.write_bytes(bytes(raw))
    elif case == "header-too-long":
        w.write_bytes((10**12).to_bytes(8, "little") + w.read_bytes()[8:])
    elif case == "bad-config":
        (ck / "config.json").write_text('{"model_type": "qwen2_vl",')
    elif case == "no-tokenizer":
        (ck / "tokenizer.json").unlink()
    elif case == "bad-tokenizer":
        (ck / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    elif case == "no-preprocessor":
        (ck / "preprocessor_config.json").unlink()
    return ck


@pytest.mark.parametrize("case, need", [
    ("no-weights", "no weights (*.safetensors)"),
    ("truncated", "truncated safetensors file"),
    ("corrupt-header", "corrupt safetensors file"),
    ("header-too-long", "corrupt or truncated safetensors file"),
    ("bad-config", "config.json: invalid JSON"),
    ("no-tokenizer", "no tokenizer.json"),
    ("bad-tokenizer", "the tokenizers library cannot load it"),
    ("no-preprocessor", "no preprocessor_config.json"),
])
def test_bad_checkpoints_are_found_before_the_export(tiny_checkpoint, tmp_path, case, need):
    """One line, and before the model is loaded: no stage finished, no staging directory, nothing written."""
    ck = _checkpoint_variant(tiny_checkpoint, tmp_path, case)
    p = cli("build", "qwen2-vl-2b", "--model", ck, "--out", tmp_path / "out", "--precision", "fp32")
    one_line(p, 2, need)
    assert sorted(x.name for x in tmp_path.iterdir()) == [case]


def test_a_broken_reference_checkpoint_for_verify_is_one_line(tiny_artifacts, tiny_checkpoint, tmp_path):
    ck = _checkpoint_variant(tiny_checkpoint, tmp_path, "truncated")
    one_line(cli("verify", tiny_artifacts, "--model", ck, "--task", "none"), 2, "truncated safetensors file")
    assert not (tmp_path / "truncated" / "verify.json").exists()


def test_checkpoint_checks_import_no_torch(tiny_checkpoint):
    code = ("import sys; from pathlib import Path; from mmexport.export.preflight import check_checkpoint_files; "
            f"check_checkpoint_files(Path({str(tiny_checkpoint)!r})); "
            "import mmexport.artifact.destination, mmexport.runtime.manifest_schema, mmexport.artifact.onnx_refs; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'safetensors') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_engines_without_any_tensorrt_is_refused_before_the_export(cache_dir, tmp_path, monkeypatch, capsys):
    """The real CLI entry point, with the TensorRT flavours made absent (no package on this machine may
    be uninstalled for a test): refused before the checkpoint is even resolved."""
    from mmexport import cli as cli_mod
    from mmexport.runtime import flavors

    monkeypatch.setattr(flavors, "available_flavors", lambda: [])
    with pytest.raises(SystemExit) as e:
        cli_mod.main(["build", "qwen2-vl-tiny", "--out", str(tmp_path / "out"), "--engines"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no TensorRT flavour is installed" in err and "done" not in err
    assert list(tmp_path.iterdir()) == []


# == Environment =============================================================================================
def test_read_only_artifact_directory_verify_reports_and_still_prints(tiny_artifacts, tmp_path):
    src = copy_artifact(tiny_artifacts, tmp_path / "src" / "art")
    with mounted("bind-ro", tmp_path / "ro", source=src.parent) as ro:
        with pytest.raises(OSError):
            (ro / "art" / "probe").write_text("x")  # root, and still read-only: no bypass
        p = cli("verify", ro / "art", "--json", "--tokens", "2", "--task", "none")
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert json.loads(p.stdout)["passed"] is True
        warn = [l for l in p.stderr.splitlines() if "verify.json" in l]
        assert len(warn) == 1 and "not written" in warn[0] and "Read-only file system" in warn[0]
        assert cli("run", ro / "art", "--prompt", "hi", "--max-new-tokens", "2").returncode == 0  # .verified.json: best effort
        one_line(cli("build", "qwen2-vl-tiny", "--out", ro / "new"), 2, "cannot write in", "Read-only file system")
    assert not (src / "verify.json").exists()


def test_out_in_a_read_only_directory_as_an_unprivileged_user(cache_dir, world_dir):
    why = can_drop_root()
    if why:
        pytest.skip(why)
    ro = world_dir / "ro"
    ro.mkdir(mode=0o755)  # owned by root: the unprivileged user may read but not write
    home = world_dir / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    p = cli("build", "qwen2-vl-tiny", "--out", ro / "new", user=NOBODY, env={"HOME": str(home)}, cwd=world_dir)
    one_line(p, 2, "cannot write in", "Permission denied")
    p = cli("build", "qwen2-vl-tiny", "--out", ro / "deeper" / "new", user=NOBODY, env={"HOME": str(home)}, cwd=world_dir)
    one_line(p, 2, "cannot create", "Permission denied")
    assert sorted(x.name for x in ro.iterdir()) == []


def test_disk_full_build_leaves_nothing(cache_dir, tmp_path):
    with mounted("tmpfs", tmp_path / "small", size="1200k") as small:
        p = cli("build", "qwen2-vl-tiny", "--out", small / "out")
        lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(lines) == 1 and "no space left on the device" in lines[0] and "left nothing" in lines[0]
        assert list(small.iterdir()) == []  # nothing that looks complete, and no staging or lock left


def test_stdout_full_closed_or_broken_is_one_line(tiny_artifacts):
    with open("/dev/full", "w") as full:
        one_line(cli("recipes", "--json", stdout=full), 2, "cannot write to standard output", "No space left on device")
    e = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(f"{sys.executable} -m mmexport recipes --json >&-", shell=True, capture_output=True, text=True, env=e, cwd=REPO)
    one_line(p, 2, "standard output is closed")
    # a reader that goes away: the streamed answer hits a broken pipe
    proc = subprocess.Popen([sys.executable, "-m", "mmexport", "run", str(tiny_artifacts), "--prompt", "hi", "--max-new-tokens", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    one_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), 2, "cannot write to standard output", "Broken pipe")


def test_internal_errors_are_one_line_with_exit_3_and_debug_shows_the_traceback(cache_dir, tmp_path):
    """A real bug, planted before the program starts (sitecustomize), escapes a command."""
    (tmp_path / "sitecustomize.py").write_text(
        "import mmexport.recipes as r\n"
        "def broken():\n    return 1 / 0\n"
        "r.list_recipes = broken\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    line = one_line(cli("recipes", env=env), 3, "internal error: ZeroDivisionError: division by zero")
    assert line.endswith("(set MMEXPORT_DEBUG=1 for the traceback)")
    p = cli("recipes", env={**env, "MMEXPORT_DEBUG": "1"})
    assert p.returncode == 3 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr
