"""What every family adapter provides, and the checkpoint-source resolution they share.

Export side only: this module may import torch (lazily, through the adapters).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime.manifest import sha256_file
from ..recipes import Recipe
from ..spec import ComponentSpec, Dim, TensorSpec
from .synthetic import synthetic_dir


@dataclass
class ExportComponent:
    """A component ready for export: its declaration, the torch module and example inputs.

    `example` is keyed by the spec's input names; its dynamic sizes are never 0 or 1 (those would be
    specialized by the tracer) and differ from the sizes verify later feeds.
    """

    spec: ComponentSpec
    module: Any  # torch.nn.Module
    example: dict[str, Any]  # name -> torch.Tensor


@dataclass
class StaticKVCache:
    """The decoder's static KV cache, declared once for every family that uses torch_ops.attend_with_cache.

    The runtime preallocates `cache_key_i/cache_value_i [batch, kv_heads, capacity, head_dim]` and
    `cache_mask [batch, capacity]` once (capacity = the recipe's context) and writes each step's new
    keys/values in place. The graph's cache axis `cache_len` takes two sizes: the whole buffer
    (`capacity`: decode, and any prefill after cached tokens; a fixed shape, as TensorRT and CUDA graphs
    like) or 0 (the first prefill of a request, when the cache is empty: the runtime passes zero-length
    views, so the prompt attends only to itself instead of to `capacity` masked slots). Each is a
    TensorRT optimization profile.

    The batch axis is dynamic, 1..max_batch (the recipe's `[limits] max_batch`): `mmexport serve` keeps
    one request per row of a `[max_batch, ...]` cache and decodes the active rows in one call; each row
    has its own cache_mask, positions and length. Export traces a batch of 2 (torch.export specializes
    sizes 0 and 1). Prefill runs one request at a time (batch 1); the decode profile covers 1..max_batch.
    """

    layers: list[int]  # layer indices that have a self-attention cache
    kv_heads: int
    head_dim: int
    capacity: int
    dtype: str = "float32"
    max_batch: int = 1

    def batch_dim(self) -> Dim:
        return Dim("batch", 1, 1, self.max_batch)

    def inputs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """(cache_mask, then the cache buffers) as two lists: families place other inputs between them."""
        mask = [TensorSpec("cache_mask", "int64", ("batch", "cache_len"), "1 = cache slot filled")]
        cache = [
            TensorSpec(f"cache_{kind}_{i}", self.dtype, ("batch", self.kv_heads, "cache_len", self.head_dim),
                       "preallocated at the context's capacity, updated in place by the runtime; 0 slots = empty")
            for i in self.layers for kind in ("key", "value")
        ]
        return mask, cache

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec(f"{kind}_{i}", self.dtype, ("batch", self.kv_heads, "seq_len", self.head_dim), "this step's keys/values")
            for i in self.layers for kind in ("key", "value")
        ]

    def dims(self) -> dict[str, Dim]:
        return {"cache_len": Dim("cache_len", 0, self.capacity, self.capacity)}

    def profiles(self) -> dict[str, dict[str, Dim]]:
        """The decoder's TensorRT profiles: prefill (one request, any prompt length, empty or full cache), decode
        (one token for each of 1..max_batch rows over the whole cache)."""
        ctx, b = self.capacity, self.max_batch
        return {
            "prefill": {"batch": Dim("batch", 1, 1, 1), "seq_len": Dim("seq_len", 1, min(256, ctx), ctx),
                        "cache_len": Dim("cache_len", 0, 0, ctx)},
            "decode": {"batch": Dim("batch", 1, b, b), "seq_len": Dim("seq_len", 1, 1, 1), "cache_len": Dim("cache_len", ctx, ctx, ctx)},
        }


def example_batch(batch: Dim) -> int:
    """The batch export traces: 2 keeps the axis dynamic (1 would be specialized); 1 when the build is batch 1."""
    return 2 if batch.max > 1 else 1


class FamilyAdapter:
    """Base class of the family adapters (see mmexport/models/__init__.py)."""

    family: str = ""
    model_types: tuple[str, ...] = ()  # accepted config.json `model_type` values

    # -- checkpoints ---------------------------------------------------------------------------
    def make_synthetic(self, recipe: Recipe, out_dir: Path) -> None:
        raise NotImplementedError

    def check_checkpoint(self, model_dir: Path) -> dict[str, Any]:
        """config.json of `model_dir`, after checking it is of this family's architecture."""
        cfg_path = model_dir / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
        cfg = json.loads(cfg_path.read_text())
        mt = cfg.get("model_type")
        if mt not in self.model_types:
            raise UserError(
                f"{model_dir}: checkpoint architecture {mt!r} does not match recipe family {self.family!r} "
                f"(expects model_type {' or '.join(self.model_types)})"
            )
        return cfg

    def load(self, model_dir: Path):
        raise NotImplementedError

    # -- export --------------------------------------------------------------------------------
    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        """The declaration of every component (drives export, manifest, engines, runtime, verify)."""
        raise NotImplementedError

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        """`specs` paired with torch modules and example inputs."""
        raise NotImplementedError

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        """What the torch-free runtime needs (goes into manifest.json under "model")."""
        raise NotImplementedError


def resolve_source(recipe: Recipe, model_override: str | None, adapter: FamilyAdapter, log=print) -> tuple[Path, dict]:
    """The local checkpoint directory to export, and a description of where it came from.

    Order: --model (a local directory, or a Hugging Face id fetched with huggingface_hub), else the
    recipe's synthetic block (materialized once into the cache), else the recipe's model id.
    """
    source = model_override or recipe.source
    if model_override is None and recipe.synthetic is not None:
        out = synthetic_dir(recipe.name, recipe.synthetic)
        if not (out / "config.json").is_file():
            log(f"creating synthetic checkpoint for {recipe.name} in {out}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
            try:
                adapter.make_synthetic(recipe, tmp)
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out, {"kind": "synthetic", "recipe": recipe.name, "path": str(out), "seed": recipe.synthetic.get("seed", 0)}
    assert source is not None
    p = Path(source).expanduser()
    if model_override is None and not p.is_absolute() and recipe.path is not None and source.startswith("."):
        p = (recipe.path.parent / p).resolve()  # a recipe's relative path is relative to the recipe file
    if p.exists():
        if not p.is_dir():
            raise UserError(f"--model {source}: not a directory")
        return p.resolve(), {"kind": "local", "path": str(p.resolve())}
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"--model {source}: no such directory (and not a Hugging Face id of the form org/name)")
    return _download(source, recipe.revision if model_override is None else None)


def _download(repo_id: str, revision: str | None) -> tuple[Path, dict]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id}: fetching from the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model"],
        )
    except Exception as e:  # network errors, gated repos, unknown ids: one line for the user
        raise UserError(f"could not fetch {repo_id} from the Hugging Face Hub: {type(e).__name__}: {e}".splitlines()[0]) from None
    p = Path(path)
    return p, {"kind": "hub", "repo_id": repo_id, "revision": p.name, "path": str(p)}


def weights_digest(model_dir: Path) -> str:
    """sha256 over the checkpoint's weight files (name + content), the identity of what was exported."""
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def reference_checkpoint(manifest_data: dict[str, Any], model: str | None, log=print) -> tuple[Recipe, "FamilyAdapter", Path, bool]:
    """What a build is compared against (verify, bench --vs-pytorch): `--model`, else the local or Hub
    directory the build was exported from, else the recipe's own source. Returns the build's recipe,
    its family adapter, the checkpoint directory and whether its weights are the ones exported."""
    from ..recipes import parse_recipe
    from . import get_adapter

    recipe = parse_recipe(manifest_data["recipe"], manifest_data["recipe"].get("name", "recipe"))
    adapter = get_adapter(manifest_data["family"])
    src = manifest_data["source"]
    if model is None and src.get("kind") in ("local", "hub") and Path(src["path"]).is_dir():
        model = src["path"]
    model_dir, _ = resolve_source(recipe, model, adapter, log=log)
    return recipe, adapter, model_dir, weights_digest(model_dir) == src.get("weights_sha256")


@contextmanager
def memoized_from_pretrained():
    """Memoize transformers' tokenizer / image-processor `from_pretrained` for the block, so a loop of
    reference requests (bench's eager side, verify's task) does not re-read the files each time (the
    runtime loads them once too)."""
    patched = []
    try:
        import transformers
        from transformers.image_processing_base import ImageProcessingMixin

        targets = [(transformers.AutoTokenizer, "from_pretrained"), (ImageProcessingMixin, "from_pretrained")]
    except ImportError:  # pragma: no cover - layout of another transformers version
        targets = []
    cache: dict[Any, Any] = {}

    def memo(func):
        def wrapper(cls, *a, **kw):
            key = (cls, func, repr(a), repr(sorted(kw.items())))
            if key not in cache:
                cache[key] = func(cls, *a, **kw)
            return cache[key]

        return classmethod(wrapper)

    for owner, name in targets:
        orig = owner.__dict__.get(name)
        if isinstance(orig, classmethod):
            setattr(owner, name, memo(orig.__func__))
            patched.append((owner, name, orig))
    try:
        yield bool(patched)
    finally:
        for owner, name, orig in patched:
            setattr(owner, name, orig)
