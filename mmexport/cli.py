"""The `mmexport` command: Typer wiring only, and the one error boundary (`main`).

Data (JSON, generated text, result tables) goes to stdout; logs and progress go to stderr.
Exit codes: 0 ok, 1 verification failed, 2 bad usage, bad input or a failing environment (one
`error:` line on stderr: UserError, Click's own usage errors, OSError such as a full disk or a closed
stdout), 3 an internal error (one line; MMEXPORT_DEBUG=1 adds the traceback), 130/143 interrupted
or terminated. Commands import their heavy modules inside the function: `mmexport run` never imports torch.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import Terminated, UserError, VerificationFailed, on_stop_signal

app = typer.Typer(
    name="mmexport",
    help="Export multimodal LLMs part by part to ONNX / TensorRT, run them torch-free, prove parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)  # stdout: results
err = Console(stderr=True)  # stderr: logs, progress

# shared option aliases
ArtifactDir = Annotated[Path, typer.Argument(help="Artifact directory written by `mmexport build`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Checkpoint: a local Hugging Face directory or a Hub id.")]
ImageOpt = Annotated[Optional[list[Path]], typer.Option("--image", help="Image file; repeat for several images.")]


def _utf8(value):
    """Option callback: text must be valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                c = ord(v[e.start])
                what = f"byte {c - 0xDC00:#04x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"
                raise typer.BadParameter(f"not valid UTF-8 text ({what} at position {e.start})") from None
    return value


def _log(msg: str) -> None:
    err.print(f"[dim]{msg}[/dim]", highlight=False)


@contextmanager
def _stage(name: str):
    import time

    t = time.perf_counter()
    with err.status(f"{name} ...", spinner="dots"):
        yield
    err.print(f"[green]done[/green] {name} [dim]({time.perf_counter() - t:.1f} s)[/dim]", highlight=False)


@app.command("recipes")
def recipes_cmd(as_json: JsonOpt = False) -> None:
    """List the recipes."""
    from .recipes import list_recipes

    rs = list_recipes()
    if as_json:
        print(json.dumps([{"name": r.name, "family": r.family, "source": r.source or "synthetic", "description": r.description} for r in rs], indent=2))
        return
    t = Table("recipe", "family", "source", "precision", "description")
    for r in rs:
        t.add_row(r.name, r.family, r.source or "synthetic (offline)", r.precision, r.description)
    out.print(t)


@app.command("build")
def build_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name (see `mmexport recipes`), path to a .toml file, or a checkpoint: "
                                               "a Hugging Face directory or Hub id (the family is detected from config.json).")],
    model: ModelOpt = None,
    max_context: Annotated[Optional[int], typer.Option("--max-context", min=16, help="Context (prompt + answer) the build holds [default: the recipe's; for a checkpoint, its config's capped at 4096].")] = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=1, help="Images per prompt [default: the recipe's, or the family's].")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory [default: artifacts/RECIPE].")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 or fp16 [default: the recipe's].")] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8 or int4: weight-only MatMul quantization (ONNX Runtime only).")] = None,
    quantize_vision: Annotated[bool, typer.Option("--quantize-vision", help="With --quantize: the vision encoder and projector too (judged by the recipe's [tolerances.SCHEME_vision]).")] = False,
    quant_method: Annotated[Optional[str], typer.Option("--quant-method", help="With --quantize: blockwise (weight-only MatMulNBits, for decode) or dynamic (int8 only: integer GEMMs, for prefill and vision) [default: the recipe's, or blockwise].")] = None,
    vision_quant_method: Annotated[Optional[str], typer.Option("--vision-quant-method", help="With --quantize-vision: the vision encoder's and projector's own method, e.g. dynamic (int8 integer GEMMs, fast prefill of an image) beside a blockwise int4 decoder [default: --quant-method].")] = None,
    prefill_quant_method: Annotated[Optional[str], typer.Option("--prefill-quant-method", help="With a blockwise --quantize: dynamic gives the decoder a second graph, int8 integer GEMMs, for prompts (prefill), beside the blockwise graph that decodes; more memory, a shorter time to first token [default: the recipe's, or none].")] = None,
    quant_block_size: Annotated[Optional[int], typer.Option("--quant-block-size", help="With --quantize (blockwise): weights per scale, a power of two >= 16; larger blocks read fewer bytes per token and lose more accuracy [default: the recipe's, or 32].")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="Decoder rows per call (`serve` batches that many requests) [default: the recipe's, or 8].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    engines: Annotated[bool, typer.Option("--engines", help="Also build TensorRT engines (as `mmexport engines`).")] = False,
    flavor: Annotated[str, typer.Option("--flavor", help="Engine flavour with --engines: auto, tensorrt, tensorrt-rtx.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Export every component of a recipe (or of any supported checkpoint) to ONNX and write the artifact directory."""
    from .recipes import load_recipe, looks_like_checkpoint, with_limits

    if looks_like_checkpoint(recipe):
        if model is not None:
            raise UserError("--model goes with a recipe; a checkpoint is given directly: mmexport build CHECKPOINT")
        from .checkpoints import checkpoint_build_recipe

        r = checkpoint_build_recipe(recipe, max_context=max_context, max_images=max_images)
    else:
        r = with_limits(load_recipe(recipe), max_context=max_context, max_images=max_images)
    if max_batch is not None:
        r = r.with_max_batch(max_batch)
    if precision is not None and precision not in ("fp32", "fp16"):
        raise UserError(f"--precision must be fp32 or fp16, got {precision!r}")
    from .artifact.destination import Destination
    from .export.build import build

    dest = out_dir or Path("artifacts") / r.name
    if quantize_vision and not quantize:
        raise UserError("--quantize-vision goes with --quantize int8|int4")
    if engines and quantize:
        raise UserError("--engines with --quantize: TensorRT does not take ONNX Runtime's MatMulNBits graphs; build engines from an unquantized build")
    if engines:
        from .runtime.flavors import resolve_flavor

        resolve_flavor(flavor)  # no usable TensorRT: refused now, not after minutes of export
    engine_info = None
    with Destination(dest, force=force, log=_log) as destination:  # locked across the export and the engines
        res = build(r, dest, model=model, precision=precision, quantize=quantize, force=force, log=_log, stage=_stage,
                    destination=destination, quantize_vision=quantize_vision, quant_method=quant_method,
                    quant_block_size=quant_block_size, vision_quant_method=vision_quant_method,
                    prefill_quant_method=prefill_quant_method)
        if engines:
            from .engines.commands import build_engines

            with _stage("engines"):
                engine_dir, meta = build_engines(dest, flavor=flavor, log=_log)
            engine_info = (engine_dir, meta)
    if as_json:
        data = {"out_dir": str(dest), "seconds": round(res.seconds, 2), "components": res.components}
        if engine_info:
            data["engines"] = {"engine_dir": str(engine_info[0]), **engine_info[1]}
        print(json.dumps(data, indent=2, default=str))
        return
    t = Table("component", "file", "size", "inputs", "export s", title=f"{r.name} -> {dest}")
    for c in res.components:
        t.add_row(c["component"], c["file"], _size(c["bytes"]), c["inputs"], f"{c['seconds']:.1f}")
    out.print(t)
    if engine_info:
        _print_engines(*engine_info, False)
    err.print(f"built in {res.seconds:.1f} s", highlight=False)


@app.command("run")
def run_cmd(
    artifacts: ArtifactDir,
    prompt: Annotated[str, typer.Option("--prompt", help="The user's text.", callback=_utf8)],
    image: ImageOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1)] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy (default).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears; repeatable.", callback=_utf8)] = None,
    raw_prompt: Annotated[bool, typer.Option("--raw-prompt", help="Use the prompt as is, without the chat template.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="ort (ONNX Runtime) or trt (TensorRT engines from `mmexport engines`).")] = "ort",
    rehash: Annotated[bool, typer.Option("--rehash", help="Hash every file of the artifact, even those unchanged since their last check.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Answer a prompt (with images) using the exported graphs. Torch-free."""
    from .runtime.pipeline import Pipeline
    from .runtime.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # bad values: one line, before loading
    pipe = Pipeline(artifacts, backend=backend, rehash=rehash)
    limit = int(pipe.manifest.limits["max_new_tokens"])
    n = max_new_tokens or limit
    if n > limit:
        raise UserError(f"--max-new-tokens {n} exceeds this build's limit of {limit}")

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = pipe.generate(prompt, list(image or []), max_new_tokens=n, sampling=params, stop=stop or [],
                        raw_prompt=raw_prompt, on_text=None if as_json else stream)
    if as_json:
        print(json.dumps(res.to_dict()))
        return
    sys.stdout.write("\n")
    tm = res.timings_ms
    err.print(
        f"[dim]{res.prompt_tokens} prompt tokens, {len(res.token_ids)} generated ({res.stop_reason}); "
        f"preprocess {tm['preprocess']:.0f} ms, vision {tm['vision']:.0f} ms, prefill {tm['prefill']:.0f} ms, "
        f"decode {res.tokens_per_s:.1f} tok/s[/dim]",
        highlight=False,
    )


@app.command("verify")
def verify_cmd(
    artifacts: ArtifactDir,
    model: ModelOpt = None,
    image: ImageOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt for the end-to-end check.", callback=_utf8)] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", min=1, help="Greedy tokens to compare [default: the recipe's].")] = None,
    backend: Annotated[str, typer.Option("--backend", help="ort or trt.")] = "ort",
    task: Annotated[str, typer.Option("--task", help="Task accuracy vs PyTorch: auto (the recipe's [task], if any), none, or a task name (shapes).")] = "auto",
    task_examples: Annotated[Optional[int], typer.Option("--task-examples", min=1, help="Held-out examples [default: the recipe's].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the same inputs through PyTorch and the exported graphs; exit 1 beyond the recipe's tolerances."""
    from .verify import render_report, verify

    report = verify(artifacts, model=model, images=list(image or []), prompt=prompt, tokens=tokens, backend=backend,
                    task=task, task_examples=task_examples, log=_log)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(report, out)
    if report.not_recorded:
        err.print(f"[yellow]warning:[/yellow] {escape(report.not_recorded)}", highlight=False, soft_wrap=True)
    if not report.passed:
        raise VerificationFailed(f"verification FAILED: {'; '.join(report.failures)}")


@app.command("bench")
def bench_cmd(
    artifacts: Annotated[list[Path], typer.Argument(metavar="ARTIFACTS", help="Artifact directory written by `mmexport build`; several: the builds are compared, all loaded, their timed runs alternated.")],
    image: Annotated[Optional[Path], typer.Option("--image", help="Image file [default: a generated 448x448 image].")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The request's text.", callback=_utf8)] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens generated per run (EOS ignored).")] = 64,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs; medians are reported.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 1,
    backend: Annotated[str, typer.Option("--backend", help="ort or trt.")] = "ort",
    vs_pytorch: Annotated[bool, typer.Option("--vs-pytorch", help="Also time transformers' eager model on the same request, in this process.")] = False,
    interleave: Annotated[bool, typer.Option("--interleave/--sequential", help="With --vs-pytorch: keep both models loaded and alternate their timed runs (fair on a machine whose speed drifts), or run one model after the other (half the memory).")] = True,
    model: ModelOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the latency breakdown as a PNG.")] = None,
    concurrency: Annotated[Optional[str], typer.Option("--concurrency", help="Serving benchmark instead: N concurrent streams against the batching engine, e.g. 1,4,8.")] = None,
    requests: Annotated[int, typer.Option("--requests", min=1, help="With --concurrency: requests each stream sends, one after the other.")] = 2,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="With --concurrency: engine slots [default: the build's max_batch].")] = None,
    limits: Annotated[bool, typer.Option("--limits/--no-limits", help="Measure this machine's read bandwidth and GEMM peak and report decode, prefill and vision as a share of them.")] = True,
    profile: Annotated[bool, typer.Option("--profile", help="Instead: where one decode step's time goes (host side, and ONNX Runtime's profiler per op type and per weight MatMul), over --new-tokens steps.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Time one request: TTFT split (preprocess / vision / projector / prefill), decode tok/s, peak memory,
    and how close decode, prefill and vision come to this machine's measured limits.
    With several ARTIFACTS: the builds compared on that request, all loaded, their timed runs alternated.
    With --concurrency: total tokens/s and TTFT of the serving engine under N concurrent streams."""
    from .bench import DEFAULT_PROMPT, bench, bench_builds, plot_bench, render_bench, render_builds

    artifact_dirs, artifacts = artifacts, artifacts[0]
    if len(artifact_dirs) > 1:
        if profile or concurrency is not None or vs_pytorch or plot:
            raise UserError("several builds are compared on their own: without --profile, --concurrency, --vs-pytorch and --plot")
        reports = bench_builds(artifact_dirs, image=image, prompt=prompt or DEFAULT_PROMPT, new_tokens=new_tokens, repeat=repeat,
                               warmup=warmup, backend=backend, limits=limits, log=_log)
        if as_json:
            print(json.dumps({"interleaved": True, "builds": [r.to_dict() for r in reports]}, indent=2))
        else:
            render_builds(reports, out)
        return
    if profile:
        from .bench import default_image
        from .bench.profile import profile_decode, render_profile
        from .runtime.image import load_image

        if concurrency is not None or vs_pytorch or plot:
            raise UserError("--profile goes without --concurrency, --vs-pytorch and --plot")
        prof = profile_decode(artifacts, [load_image(image) if image else default_image()], prompt or DEFAULT_PROMPT,
                              steps=new_tokens, backend=backend, log=_log)
        if as_json:
            print(json.dumps(prof.to_dict(), indent=2))
        else:
            render_profile(prof, out)
        return
    if concurrency is not None:
        from .serve.bench import render_serve_bench, serve_bench

        try:
            levels = [int(x) for x in concurrency.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--concurrency takes numbers separated by commas, got {concurrency!r}") from None
        if not levels or min(levels) < 1 or vs_pytorch or plot:
            raise UserError("--concurrency needs positive numbers and goes without --vs-pytorch and --plot")
        rep = serve_bench(artifacts, levels, image, prompt or DEFAULT_PROMPT, new_tokens, requests=requests,
                          max_batch=max_batch, backend=backend, log=_log)
        if as_json:
            print(json.dumps(rep.to_dict(), indent=2))
        else:
            render_serve_bench(rep, out)
        return

    report = bench(artifacts, image=image, prompt=prompt or DEFAULT_PROMPT, new_tokens=new_tokens, repeat=repeat,
                   warmup=warmup, backend=backend, vs_pytorch=vs_pytorch, model=model, interleave=interleave, limits=limits, log=_log)
    if plot:
        plot_bench(report, plot)
        _log(f"wrote {plot}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_bench(report, out)


@app.command("serve")
def serve_cmd(
    artifacts: ArtifactDir,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="Requests decoded together [default: the build's max_batch].")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait for a slot; more get 429.")] = 64,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MMEXPORT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 (or $MMEXPORT_API_KEY).")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients use [default: the recipe's name].")] = None,
    allowed_local_media: Annotated[Optional[Path], typer.Option("--allowed-local-media", help="Allow file:// image URLs below this directory.")] = None,
    allow_remote_images: Annotated[bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs (off: data: URLs only).")] = False,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body.")] = 32.0,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", min=1, help="Largest image (width x height), checked before decoding.")] = 16_000_000,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", min=0.0, help="Seconds running requests get to finish on SIGINT/SIGTERM.")] = 30.0,
    backend: Annotated[str, typer.Option("--backend", help="ort or trt.")] = "ort",
) -> None:
    """Serve a build over HTTP in OpenAI's chat-completions format, with continuous batching. Torch-free."""
    from .runtime.manifest import load_manifest

    try:
        from .serve.app import ServeConfig, serve
    except ImportError as e:
        raise UserError(f"`mmexport serve` needs the serve extra (pip install 'mmexport[serve]'): {e}") from None
    m = load_manifest(artifacts, check_files=False)
    build_batch = int(m.limits.get("max_batch", 1))
    if max_batch is not None and max_batch > build_batch:
        raise UserError(f"--max-batch {max_batch}: this build's decoder takes at most {build_batch} rows (rebuild with `mmexport build --max-batch {max_batch}`)")
    if allowed_local_media is not None and not allowed_local_media.is_dir():
        raise UserError(f"--allowed-local-media {allowed_local_media}: not a directory")
    cfg = ServeConfig(artifacts, backend=backend, max_batch=max_batch, max_queue=max_queue, api_key=api_key, model_name=model_name,
                      max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                      local_media=allowed_local_media, remote_images=allow_remote_images, shutdown_timeout=shutdown_timeout)
    _log(f"serving {artifacts} on http://{host}:{port}/v1 ({max_batch or build_batch} slots)")
    serve(cfg, host=host, port=port)


@app.command("triton")
def triton_cmd(
    artifacts: ArtifactDir,
    out_dir: Annotated[Path, typer.Option("--out", help="Model repository directory (created if needed).")],
    name: Annotated[Optional[str], typer.Option("--name", help="Model name [default: the recipe's name].")] = None,
    instances: Annotated[int, typer.Option("--instances", min=1, help="Model instances (each loads the build and batches its own requests).")] = 1,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="Requests each instance decodes together [default: the build's].")] = None,
    backend: Annotated[str, typer.Option("--backend", help="ort or trt (TensorRT engines from `mmexport engines`).")] = "ort",
    kind: Annotated[str, typer.Option("--kind", help="Instance kind: cpu or gpu (one instance group per GPU).")] = "cpu",
    artifact_path: Annotated[Optional[str], typer.Option("--artifact-path", help="Reference the build at this path on the serving machine instead of linking it into the repository.")] = None,
    decoupled: Annotated[bool, typer.Option("--decoupled/--no-decoupled", help="Decoupled: streamed tokens (gRPC streams, generate_stream); not: one response per request (KServe v2 `infer` over HTTP).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace a model this command wrote before.")] = False,
) -> None:
    """Write a Triton Inference Server model repository (Python backend, decoupled streaming) that serves the build."""
    from .serve.triton import write_repository

    model_dir = write_repository(artifacts, out_dir, name=name, instances=instances, max_batch=max_batch, backend=backend,
                                 kind=kind, artifact_path=artifact_path, force=force, decoupled=decoupled)
    _log(f"wrote {model_dir} ({instances} instance(s), {kind}, {backend}); run: tritonserver --model-repository {out_dir}")
    print(str(model_dir))


@app.command("engines")
def engines_cmd(
    artifacts: ArtifactDir,
    flavor: Annotated[str, typer.Option("--flavor", help="auto, tensorrt or tensorrt-rtx.")] = "auto",
    workspace: Annotated[Optional[int], typer.Option("--workspace", min=1, help="Builder workspace limit in MB.")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option("--timing-cache", help="Timing cache file to read and update.")] = None,
    print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec lines instead of building.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild engines that are up to date.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build one TensorRT engine per component (profiles from the component declarations)."""
    from .engines.commands import build_engines, trtexec_lines

    if flavor not in ("auto", "tensorrt", "tensorrt-rtx"):
        raise UserError(f"--flavor must be auto, tensorrt or tensorrt-rtx, got {flavor!r}")
    if print_trtexec:
        print("\n".join(trtexec_lines(artifacts, workspace_mb=workspace, timing_cache=timing_cache)))
        return
    engine_dir, meta = build_engines(artifacts, flavor=flavor, workspace_mb=workspace, timing_cache=timing_cache, force=force, log=_log)
    _print_engines(engine_dir, meta, as_json)


def _print_engines(engine_dir: Path, meta: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"engine_dir": str(engine_dir), **meta}, indent=2, default=str))
        return
    t = Table("component", "engine", "size", "profiles", "build s", title=f"{meta.get('flavor')} {meta.get('version')} -> {engine_dir}")
    for name, c in meta["components"].items():
        t.add_row(name, Path(c["engine"]).name, _size(int(c.get("engine_bytes", 0))), ", ".join(c.get("profile_names", [])),
                  f"{float(c.get('build_seconds') or 0):.1f}")
    out.print(t)


@app.command("lint")
def lint_cmd(artifacts: ArtifactDir, as_json: JsonOpt = False) -> None:
    """List what in each graph is risky for TensorRT (ops, dtypes, data-dependent shapes, profiles)."""
    from .lint import has_errors, lint_artifacts, lint_report_json, render_lint

    findings = lint_artifacts(artifacts)
    if as_json:
        print(json.dumps(lint_report_json(artifacts, findings), indent=2))
    else:
        render_lint(findings, out, artifacts)
    if has_errors(findings):
        raise VerificationFailed("lint found graphs TensorRT will not accept")


@app.command("doctor")
def doctor_cmd(as_json: JsonOpt = False) -> None:
    """What this machine has (Python, ONNX Runtime, TensorRT, CUDA, Jetson) and what it can do."""
    from .doctor import doctor, render_doctor

    d = doctor()
    if as_json:
        print(json.dumps(d, indent=2, default=str))
    else:
        render_doctor(d, out)


@app.command("inspect")
def inspect_cmd(artifacts: ArtifactDir, as_json: JsonOpt = False) -> None:
    """Show what an artifact directory's manifest holds."""
    from .runtime.manifest import load_manifest

    m = load_manifest(artifacts, check_files=False)
    d = m.data
    if as_json:
        print(json.dumps(d, indent=2))
        return
    src = d["source"]
    out.print(f"[bold]{artifacts}[/bold]  recipe [cyan]{d['recipe'].get('name')}[/cyan]  family [cyan]{d['family']}[/cyan]  "
              f"precision [cyan]{d['precision']}[/cyan]  opset {d['opset']}  schema {d['schema_version']}", highlight=False)
    out.print(f"source: {src.get('kind')} {src.get('repo_id') or src.get('path')}  weights sha256 {src.get('weights_sha256', '')[:16]}...", highlight=False)
    out.print("limits: " + ", ".join(f"{k}={v}" for k, v in d["limits"].items()), highlight=False)
    for name, c in d["components"].items():
        t = Table("", "tensor", "dtype", "shape", title=f"{name}  ({c['file']}, sha256 {c['sha256'][:12]}...)", title_justify="left")
        spec = c["spec"]
        for io, key in (("in", "inputs"), ("out", "outputs")):
            for tt in spec[key]:
                t.add_row(io, tt["name"], tt["dtype"], escape("[" + ", ".join(str(x) for x in tt["shape"]) + "]"))
        out.print(t)
        dims = "; ".join(f"{n} {v['min']}..{v['max']} (opt {v['opt']})" for n, v in spec["dims"].items())
        out.print(f"  dims: {dims or 'all static'}", highlight=False)
        for p, over in spec.get("profiles", {}).items():
            out.print(f"  profile {p}: " + "; ".join(f"{n} {v['min']}..{v['max']} (opt {v['opt']})" for n, v in over.items()), highlight=False)
    tok = d["tokenizer"]
    out.print(f"tokenizer: {tok['file']}, chat template {'yes' if tok.get('chat_template') else 'no'}, eos ids {tok['eos_token_ids']}", highlight=False)
    out.print("model: " + json.dumps(d["model"]), highlight=False)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()), highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Stdout:
    """sys.stdout, with its write errors told apart from every other OSError (a closed pipe or a full
    disk behind stdout is the environment's, and one line like any other)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s):
        try:
            return self._stream.write(s)
        except OSError as e:
            raise _StdoutError(e) from None

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            raise _StdoutError(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _StdoutError(Exception):
    def __init__(self, e: OSError):
        super().__init__(f"cannot write to standard output ({e.strerror or e})")


def _say(line: str, markup: str = "[red]error:[/red] ") -> None:
    try:
        err.print(f"{markup}{escape(line)}", highlight=False, soft_wrap=True)
    except Exception:  # stderr is gone too: the exit code is all that is left
        pass


def _first_line(text: str, limit: int = 300) -> str:
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    line = "; ".join(lines[:2]) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _click_classes(name: str) -> tuple[type, ...]:
    """The Click exception class `name` as Typer raises it: recent Typer vendors Click (typer._click),
    older Typer uses the click package; both are caught."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found) or (type(f"_No{name}", (Exception,), {}),)


def _dispatch(args: list[str]) -> int:
    """Run the command line; every outcome is an exit code and at most one line on stderr."""
    debug = os.environ.get("MMEXPORT_DEBUG", "") not in ("", "0")
    try:
        command = typer.main.get_command(app)
        with command.make_context("mmexport", list(args)) as ctx:
            command.invoke(ctx)
        return 0
    except _click_classes("Exit") as e:  # --help, or a command's own exit
        return e.exit_code
    except _click_classes("NoArgsIsHelpError") as e:
        text = e.ctx.get_help() if e.ctx else ""
        if text:
            print(text)
        return 2
    except _click_classes("ClickException") as e:  # Click's and Typer's own usage errors: bad values, missing options, ranges
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        _say(_first_line(e.format_message()) + hint)
        return 2
    except (*_click_classes("Abort"), KeyboardInterrupt):
        _say("interrupted", "")
        return 130
    except Terminated as e:
        _say("terminated", "")
        return e.exit_code
    except UserError as e:
        _say(str(e))  # messages quote paths and TOML tables like [tolerances.int4]: printed as text
        return e.exit_code
    except VerificationFailed as e:
        _say(str(e), "")
        return e.exit_code
    except _StdoutError as e:
        _say(str(e))
        return 2
    except OSError as e:  # the environment: a full disk, a read-only directory, a missing permission
        if debug:
            import traceback

            traceback.print_exc()
        what = e.strerror or _first_line(e) or type(e).__name__
        _say(what + (f": {e.filename}" if e.filename else ""))
        return 2
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        _say(f"internal error: {type(e).__name__}: {_first_line(e)} (set MMEXPORT_DEBUG=1 for the traceback)")
        return 3


def main(argv: Optional[list[str]] = None) -> None:
    """The one error boundary (see the module doc)."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        _say("standard output is closed")
        sys.exit(2)
    previous = signal.signal(signal.SIGTERM, on_stop_signal)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # not where SIGINT is ignored (a background job keeps ignoring it)
        signal.signal(signal.SIGINT, on_stop_signal)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 print as their own bytes
    real_stdout = sys.stdout
    sys.stdout = _Stdout(real_stdout)
    code = _dispatch(sys.argv[1:] if argv is None else argv)
    try:
        sys.stdout.flush()
    except _StdoutError as e:
        if code == 0:
            _say(str(e))
            code = 2
    except Exception:
        pass
    finally:
        sys.stdout = real_stdout
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
    try:
        real_stdout.flush()
    except Exception:  # the data cannot go anywhere: make the interpreter's last flush go nowhere as well
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, real_stdout.fileno())
        except Exception:
            pass
    sys.exit(code)
