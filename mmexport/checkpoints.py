"""Where a build's weights come from, and what it is compared against.

`resolve_source`: a recipe's synthetic checkpoint (made once into the cache), a local Hugging Face
directory, or a Hub id; `weights_digest`: the identity of the exported weights; `reference_checkpoint`:
the checkpoint verify and bench compare a build with. Export side only (torch is imported lazily).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .recipes import Recipe
from .runtime.manifest import sha256_file
from .synthetic import synthetic_dir

if TYPE_CHECKING:
    from .families.base import FamilyAdapter


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
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the cache from other users
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
    from .families import get_adapter
    from .recipes import parse_recipe

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


def checkpoint_build_recipe(arg: str, max_context: int | None = None, max_images: int | None = None) -> Recipe:
    """The recipe for `mmexport build CHECKPOINT`: a local Hugging Face directory or a Hub id (fetched), its
    family detected from config.json's `model_type`, limits from the checkpoint and the options."""
    from .families import family_for_model_type, get_adapter
    from .families.base import read_config
    from .recipes import checkpoint_recipe

    p = Path(arg).expanduser()
    if p.is_dir():
        model_dir = p.resolve()
    elif arg.startswith((".", "/", "~")) or arg.count("/") != 1:
        raise UserError(f"{arg}: no such directory, recipe or Hugging Face id (org/name)")
    else:
        model_dir, _ = _download(arg, None)
    cfg = read_config(model_dir)
    fam = family_for_model_type(cfg.get("model_type"), where=arg)
    return checkpoint_recipe(arg, model_dir, cfg, fam.name, get_adapter(fam.name).default_limits(cfg), max_context, max_images)
