"""`mmexport build`: recipe -> checkpoint -> components -> ONNX graphs -> artifact directory.

The build writes into a temporary sibling directory and renames it into place at the very end, so a
failed or interrupted build never leaves a directory that looks complete. The destination is locked
for the whole build, stale temporary directories of killed builds are removed, and `--force` replaces
only an artifact or an empty directory (mmexport/artifact/destination.py). The checkpoint's files are
checked before the model is loaded (export/preflight.py).
"""
from __future__ import annotations

import errno
import json
import platform
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import UserError, check_terminated, deferred_termination
from ..artifact.destination import Destination
from ..checkpoints import resolve_source, weights_digest
from ..families import get_adapter
from ..recipes import Recipe
from ..runtime.manifest import sha256_file, write_manifest
from .onnx_export import export_component
from .preflight import check_checkpoint_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class BuildResult:
    out_dir: Path
    components: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def build(
    recipe: Recipe,
    out_dir: Path,
    model: str | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    stage: Callable[[str], Any] | None = None,
    destination: Destination | None = None,
    quantize_vision: bool = False,
    quant_method: str | None = None,
    quant_block_size: int | None = None,
    vision_quant_method: str | None = None,
    prefill_quant_method: str | None = None,
) -> BuildResult:
    """Export every component of `recipe` into `out_dir`. `stage(name)` is a context-manager factory for progress.
    `destination`: an entered `Destination` for `out_dir` when the caller holds its lock for longer
    (the CLI keeps it across `--engines`); by default the build takes it for itself. `quantize_vision`: with
    `quantize`, the vision encoder and projector too (as the recipe's `[export] quantize_vision`); `quant_method`:
    blockwise or dynamic (as `[export] quant_method`, default blockwise); `quant_block_size`: weights per scale of
    blockwise quantization (as `[export] quant_block_size`, default 32); `vision_quant_method`: with
    `quantize_vision`, the vision components' own method (as `[export] vision_quant_method`; default the
    decoder's), e.g. dynamic int8 for the vision tower's large GEMMs beside a block-wise int4 decode step;
    `prefill_quant_method`: a second decoder graph for the prompt (as `[export] prefill_quant_method`: dynamic,
    int8 integer GEMMs), beside the block-wise graph that decodes."""
    t0 = time.perf_counter()
    stage = stage or _null_stage
    precision = precision or recipe.precision
    if precision not in recipe.tolerances:
        raise UserError(f"recipe {recipe.name} has no tolerances for precision {precision!r}")
    qcfg = _quant_config(recipe, quantize, quantize_vision, quant_method, quant_block_size, vision_quant_method,
                         prefill_quant_method)
    if qcfg and "dynamic" in (qcfg["method"], qcfg["vision_method"], qcfg["prefill_method"]) and precision != "fp32":
        raise UserError(f"dynamic quantization takes an fp32 build, not {precision}")
    with (nullcontext(destination) if destination is not None else Destination(out_dir, force=force, log=log)) as dest:
        try:
            result = _build_into(dest, recipe, model, precision, qcfg, log, stage)
        except OSError as e:
            # writers below (numpy's tofile, onnx) may report a full disk without an errno; the free space says it
            free = _free_bytes(dest.parent)
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or (e.errno is None and free is not None and free < (1 << 20)):
                raise UserError(f"no space left on the device of {dest.parent} ({free} bytes free); "
                                f"the build stopped and left nothing at {out_dir}") from None
            raise
    result.seconds = time.perf_counter() - t0
    return result


def _build_into(dest: Destination, recipe: Recipe, model: str | None, precision: str, qcfg: dict[str, Any] | None,
                log: Callable[[str], None], stage: Callable[[str], Any]) -> BuildResult:
    out_dir = dest.out_dir
    adapter = get_adapter(recipe.family)

    with stage("checkpoint"):
        model_dir, source = resolve_source(recipe, model, adapter, log=log)
        check_checkpoint_files(model_dir, adapter.check_checkpoint)  # found now, not after minutes of export
        source["weights_sha256"] = weights_digest(model_dir)
    with stage("load"):
        try:
            torch_model = adapter.load(model_dir)
        except UserError:
            raise
        except Exception as e:  # transformers' word on a checkpoint it cannot load is about the user's files
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(f"{model_dir}: transformers cannot load this checkpoint ({type(e).__name__}: {msg})") from None

    tmp = dest.staging()
    (tmp / "onnx").mkdir()
    files: list[str] = []
    comps: dict[str, Any] = {}
    result = BuildResult(out_dir)
    for comp in adapter.components(torch_model, recipe, model_dir):
        with stage(f"export {comp.spec.name}"), deferred_termination():  # torch's exporter may swallow SIGTERM
            t1 = time.perf_counter()
            path = export_component(comp, tmp / "onnx", recipe.opset, log=log)
            if precision == "fp16":
                from .precision import convert_fp16

                convert_fp16(path, comp.spec)
            prefill = None
            if qcfg and comp.spec.name == "decoder" and qcfg["prefill_method"]:
                from .quantize import quantize_component

                # the prompt's graph: a copy of the exported decoder (its external data still the export's file),
                # quantized before the decoder itself is
                prefill = path.with_name(f"{path.stem}_prefill{path.suffix}")
                shutil.copyfile(path, prefill)
                qcfg["report"]["decoder_prefill"] = quantize_component(
                    prefill, 8, symmetric=qcfg["symmetric"], exclude_lm_head=not qcfg["lm_head"], method=qcfg["prefill_method"])
            if qcfg and comp.spec.name in qcfg["components"]:
                from .quantize import quantize_component

                vision = comp.spec.name in VISION_STAGES
                qcfg["report"][comp.spec.name] = quantize_component(
                    path, qcfg["vision_bits" if vision else "bits"], block_size=qcfg["block_size"], symmetric=qcfg["symmetric"],
                    exclude_lm_head=not qcfg["lm_head"], quantize_embeddings=comp.spec.name == "embed_tokens",
                    accuracy_level=qcfg["accuracy_level"], method=qcfg["vision_method" if vision else "method"],
                )
            rel = [str(p.relative_to(tmp)) for p in sorted(path.parent.glob(path.name + "*"))]
            files += rel
            comps[comp.spec.name] = {
                "file": str(path.relative_to(tmp)),
                "data_files": [r for r in rel if r != str(path.relative_to(tmp))],
                "sha256": sha256_file(path),
                "spec": comp.spec.to_dict(),
            }
            if prefill is not None:  # the same declaration: one interface, two graphs (the runtime picks by seq_len)
                prel = [str(p.relative_to(tmp)) for p in sorted(prefill.parent.glob(prefill.name + "*"))]
                files += prel
                comps[comp.spec.name]["prefill"] = {
                    "file": str(prefill.relative_to(tmp)),
                    "data_files": [r for r in prel if r != str(prefill.relative_to(tmp))],
                    "sha256": sha256_file(prefill),
                }
                rel += prel
            size = sum((tmp / r).stat().st_size for r in rel)
            result.components.append(
                {
                    "component": comp.spec.name,
                    "file": str(path.relative_to(tmp)),
                    "bytes": size,
                    "inputs": ", ".join(t.name for t in comp.spec.inputs[:3])
                    + (f" +{len(comp.spec.inputs) - 3} more" if len(comp.spec.inputs) > 3 else ""),
                    "seconds": round(time.perf_counter() - t1, 2),
                }
            )
    with stage("tokenizer + manifest"):
        tok = _copy_tokenizer(model_dir, tmp / "tokenizer", adapter.chat_template_for(model_dir))
        files += tok.pop("files")
        manifest = {
            "mmexport_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.to_dict(),
            "family": recipe.family,
            "source": source,
            "precision": precision,
            "quantization": ({k: v for k, v in qcfg.items() if k != "report"} | {"components": qcfg["report"]}) if qcfg else None,
            "opset": recipe.opset,
            "limits": {
                "max_images": recipe.limits.max_images,
                "max_context": recipe.limits.max_context,
                "max_new_tokens": recipe.limits.max_new_tokens,
                "max_batch": recipe.limits.max_batch,
            },
            "components": comps,
            "tokenizer": tok,
            "model": adapter.runtime_config(torch_model, model_dir, recipe),
            "versions": _versions(),
            "files": files,
        }
        _normal_permissions(tmp)  # before the hashes are recorded: chmod moves a file's ctime
        write_manifest(tmp, manifest)
    check_terminated()  # a SIGTERM that library code swallowed still stops the build before anything is installed
    dest.install(tmp)
    return result


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


VISION_STAGES = ("vision_encoder", "projector")  # the components --quantize-vision quantizes (those a build has)


def vision_gate(scheme: str) -> str:
    """The recipe tolerance table that judges quantized vision components (`int8_vision`, `int4_vision`)."""
    return f"{scheme}_vision"


_TOOLS = {"blockwise": "onnxruntime MatMulNBitsQuantizer (weight-only, block-wise RTN)",
          "dynamic": "onnxruntime quantize_dynamic (per-channel int8 weights, uint8 activations per tensor at run time)"}


def _quant_config(recipe: Recipe, quantize: str | None, quantize_vision: bool = False,
                  quant_method: str | None = None, block_size: int | None = None,
                  vision_method: str | None = None, prefill_method: str | None = None) -> dict[str, Any] | None:
    """Weight-only quantization settings from the recipe's [export] table (None: not quantized). Quantized vision
    components have a gate of their own, `[tolerances.<their scheme>_vision]`: without one they are not built.
    They take the decoder's method unless `vision_method` says otherwise (dynamic is always int8).
    `prefill_method` (dynamic): the decoder gets a second graph for prompts, judged by the build's own gate (verify
    feeds the decoder prompts, per component and end to end)."""
    if quantize is None:
        for flag, v in (("--quant-method", quant_method), ("--quant-block-size", block_size), ("--vision-quant-method", vision_method),
                        ("--prefill-quant-method", prefill_method)):
            if v is not None:
                raise UserError(f"{flag} goes with --quantize int8|int4")
        return None
    from .quantize import QUANT_METHODS, QUANT_NAMES

    if quantize not in QUANT_NAMES:
        raise UserError(f"--quantize must be one of {', '.join(QUANT_NAMES)}, got {quantize!r}")
    if quantize not in recipe.tolerances:
        raise UserError(f"recipe {recipe.name} has no [tolerances.{quantize}]: its accuracy gate is not stated, so it is not built")
    exp = recipe.raw.get("export", {})
    method = quant_method or exp.get("quant_method", "blockwise")
    if method not in QUANT_METHODS:
        raise UserError(f"the quantization method must be one of {', '.join(QUANT_METHODS)}, got {method!r}")
    if method == "dynamic" and QUANT_NAMES[quantize] != 8:
        raise UserError(f"dynamic quantization is 8-bit: --quantize int8, not {quantize}")
    if method == "dynamic" and block_size is not None:
        raise UserError("dynamic quantization is per channel, without blocks: --quant-block-size goes with --quant-method blockwise")
    block_size = int(block_size if block_size is not None else exp.get("quant_block_size", 32))
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"the quantization block size must be a power of two, at least 16, got {block_size}")
    comps = ["decoder"]
    with_vision = quantize_vision or exp.get("quantize_vision", False)
    if vision_method is not None and not with_vision:
        raise UserError("--vision-quant-method goes with --quantize-vision")
    vmethod = vision_method or exp.get("vision_quant_method") or method
    if vmethod not in QUANT_METHODS:
        raise UserError(f"the vision quantization method must be one of {', '.join(QUANT_METHODS)}, got {vmethod!r}")
    vscheme = "int8" if vmethod == "dynamic" else quantize  # dynamic quantization is 8-bit
    if with_vision:
        if vision_gate(vscheme) not in recipe.tolerances:
            raise UserError(f"recipe {recipe.name} has no [tolerances.{vision_gate(vscheme)}]: the accuracy gate of a "
                            f"{vscheme} vision encoder is not stated, so it is not built")
        comps += list(VISION_STAGES)
    if exp.get("quantize_embeddings", False):
        comps.append("embed_tokens")
    pmethod = prefill_method or exp.get("prefill_quant_method")
    if pmethod is not None and pmethod != "dynamic":
        raise UserError(f"the prefill quantization method must be dynamic (int8 integer GEMMs for prompts), got {pmethod!r}")
    if pmethod is not None and method == "dynamic":
        raise UserError("--prefill-quant-method goes with a blockwise decoder: with --quant-method dynamic the decoder "
                        "already prefills with integer GEMMs")
    return {
        "scheme": quantize,
        "bits": QUANT_NAMES[quantize],
        "method": method,
        "tool": _TOOLS[method],
        "vision_scheme": vscheme if with_vision else None,
        "vision_bits": QUANT_NAMES[vscheme] if with_vision else None,
        "vision_method": vmethod if with_vision else None,
        "vision_tool": _TOOLS[vmethod] if with_vision else None,
        "prefill_method": pmethod,
        "prefill_tool": _TOOLS[pmethod] if pmethod else None,
        "block_size": block_size,
        "symmetric": bool(exp.get("quant_symmetric", True)),
        "lm_head": bool(exp.get("quantize_lm_head", True)),
        "embeddings": bool(exp.get("quantize_embeddings", False)),
        "accuracy_level": exp.get("quant_accuracy_level"),
        "components": comps,
        "report": {},
    }


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 directory and some writers leave 0600 files; give the artifact the
    permissions any other file the user creates gets (0777/0666 less the umask)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _special_tokens(cfg: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v:
            out[key] = v
    return out


def _copy_tokenizer(model_dir: Path, dest: Path, default_template: str | None = None) -> dict[str, Any]:
    dest.mkdir(parents=True)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json (the runtime needs the fast tokenizer file)")
    files = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
            files.append(f"tokenizer/{name}")
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").is_file() else {}
    template = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "chat_template.json").is_file():
        template = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
    elif isinstance(tcfg.get("chat_template"), str):
        template = tcfg["chat_template"]
    else:  # a checkpoint without one (Fuyu): the prompt layout its family's processor builds, if it has one
        template = default_template
    if template:
        (dest / "chat_template.jinja").write_text(template)
        files.append("tokenizer/chat_template.jinja")

    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(dest / "tokenizer.json"))
    eos: list[int] = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        eos += e if isinstance(e, list) else ([e] if e is not None else [])
    special = _special_tokens(tcfg)
    if "eos_token" in special and tk.token_to_id(special["eos_token"]) is not None:
        eos.append(tk.token_to_id(special["eos_token"]))
    return {
        "file": "tokenizer/tokenizer.json",
        "chat_template": "tokenizer/chat_template.jinja" if template else None,
        "special_tokens": special,
        "eos_token_ids": sorted(set(int(i) for i in eos)),
        "files": files,
    }


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


class _null_stage:
    def __init__(self, name: str):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
