"""Recipes: data files (recipes/NAME.toml) that say what to export and how it must behave.

A recipe names a model family (the adapter that knows the architecture), a weight source (a Hugging
Face id or local directory, or a `synthetic` block that builds a tiny seeded checkpoint offline),
limits (images per prompt, context, new tokens, decoder batch rows), export precision, and parity tolerances.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Tolerance:
    """What verify demands of one precision."""

    component_max_abs: float
    component_min_cosine: float
    logits_max_abs: float
    greedy_tokens: int
    min_token_agreement: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tolerance":
        return cls(
            component_max_abs=float(d["component_max_abs"]),
            component_min_cosine=float(d.get("component_min_cosine", 0.9999)),
            logits_max_abs=float(d["logits_max_abs"]),
            greedy_tokens=int(d.get("greedy_tokens", 16)),
            min_token_agreement=float(d.get("min_token_agreement", 1.0)),
        )


DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_context: int
    max_new_tokens: int
    # rows the decoder graph takes at once (`mmexport serve` decodes that many requests per step);
    # the traced batch axis is dynamic 1..max_batch, and TensorRT's decode profile covers it
    max_batch: int = DEFAULT_MAX_BATCH


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    description: str
    source: str | None  # HF id or local path; None when synthetic
    revision: str | None
    synthetic: dict[str, Any] | None
    limits: Limits
    precision: str
    opset: int
    tolerances: dict[str, Tolerance]
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    task: dict[str, Any] | None = None  # [task]: a task-accuracy gate for verify (see mmexport/taskeval.py)

    def tolerance(self, precision: str) -> Tolerance:
        if precision not in self.tolerances:
            raise UserError(f"recipe {self.name} declares no tolerances for precision {precision!r}")
        return self.tolerances[precision]

    def to_dict(self) -> dict[str, Any]:
        return self.raw

    def with_max_batch(self, max_batch: int) -> "Recipe":
        """This recipe with another `[limits] max_batch` (`mmexport build --max-batch`)."""
        import dataclasses

        raw = {**self.raw, "limits": {**self.raw.get("limits", {}), "max_batch": max_batch}}
        return dataclasses.replace(self, limits=dataclasses.replace(self.limits, max_batch=max_batch), raw=raw)


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise UserError(f"{where}: missing key {key!r}")
    return d[key]


def parse_recipe(data: dict[str, Any], name: str, path: Path | None = None) -> Recipe:
    where = str(path) if path else f"recipe {name}"
    src = _require(data, "source", where)
    synthetic = src.get("synthetic")
    model = src.get("model")
    if (synthetic is None) == (model is None):
        raise UserError(f"{where}: [source] needs exactly one of 'model' or a [source.synthetic] table")
    lim = _require(data, "limits", where)
    exp = data.get("export", {})
    precision = exp.get("precision", "fp32")
    if precision not in ("fp32", "fp16"):
        raise UserError(f"{where}: export.precision must be fp32 or fp16, got {precision!r}")
    max_batch = int(lim.get("max_batch", DEFAULT_MAX_BATCH))
    if max_batch < 1:
        raise UserError(f"{where}: limits.max_batch must be at least 1, got {max_batch}")
    tols = {k: Tolerance.from_dict(v) for k, v in _require(data, "tolerances", where).items()}
    task = data.get("task")
    if task is not None:
        unknown = set(task) - {"name", "examples", "min_accuracy", "max_accuracy_drop"}
        if "name" not in task or unknown:
            raise UserError(f"{where}: [task] needs 'name' (and optionally examples, min_accuracy, max_accuracy_drop)"
                            + (f"; unknown key(s) {', '.join(sorted(unknown))}" if unknown else ""))
    return Recipe(
        name=data.get("name", name),
        family=_require(data, "family", where),
        description=data.get("description", ""),
        source=model,
        revision=src.get("revision"),
        synthetic=synthetic,
        limits=Limits(
            max_images=int(_require(lim, "max_images", where)),
            max_context=int(_require(lim, "max_context", where)),
            max_new_tokens=int(_require(lim, "max_new_tokens", where)),
            max_batch=max_batch,
        ),
        precision=precision,
        opset=int(exp.get("opset", 18)),
        tolerances=tols,
        path=path,
        raw=data,
        task=task,
    )


def recipe_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("MMEXPORT_RECIPES", "").split(os.pathsep) if p]
    dirs.append(RECIPES_DIR)
    return dirs


def list_recipes() -> list[Recipe]:
    seen: dict[str, Recipe] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            if p.stem not in seen:
                seen[p.stem] = load_recipe(str(p))
    return list(seen.values())


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (searched in $MMEXPORT_RECIPES, then recipes/) or by path to a .toml file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        path = p
    else:
        path = next((d / f"{name_or_path}.toml" for d in recipe_dirs() if (d / f"{name_or_path}.toml").is_file()), None)
        if path is None:
            known = sorted({q.stem for d in recipe_dirs() for q in d.glob("*.toml")})
            raise UserError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(known) or 'none'}")
    from .artifact.files import read_text

    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    return parse_recipe(data, path.stem, path)


CHECKPOINT_DEFAULTS = Path(__file__).resolve().parent / "data" / "checkpoint_defaults.toml"


def looks_like_checkpoint(arg: str) -> bool:
    """Whether a `build` argument names a checkpoint rather than a recipe: a directory holding config.json, or
    anything with a path separator that is not a .toml file (a path, or a Hub id `org/name`)."""
    p = Path(arg).expanduser()
    if p.suffix == ".toml":
        return False
    return (p / "config.json").is_file() or "/" in arg or os.sep in arg


def with_limits(recipe: Recipe, max_context: int | None = None, max_images: int | None = None) -> Recipe:
    """The recipe with its context or images per prompt changed (build's --max-context / --max-images)."""
    if max_context is None and max_images is None:
        return recipe
    raw = dict(recipe.raw)
    raw["limits"] = dict(raw["limits"])
    if max_context is not None:
        raw["limits"]["max_context"] = max_context
        raw["limits"]["max_new_tokens"] = min(int(raw["limits"]["max_new_tokens"]), max_context // 2)
    if max_images is not None:
        raw["limits"]["max_images"] = max_images
    return parse_recipe(raw, recipe.name, recipe.path)


def checkpoint_recipe(source: str, model_dir: Path, config: dict[str, Any], family: str, family_limits: dict[str, int],
                      max_context: int | None = None, max_images: int | None = None) -> Recipe:
    """The recipe of a checkpoint built without one: `source` (the directory or Hub id as given) exported as
    its family, with the limits of mmexport/data/checkpoint_defaults.toml, the config and the options."""
    defaults = tomllib.loads(CHECKPOINT_DEFAULTS.read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    cap = int(defaults["limits"]["max_context"])
    if max_context is not None:
        if limit and max_context > int(limit):
            raise UserError(f"--max-context {max_context} exceeds the checkpoint's max_position_embeddings ({limit})")
        ctx = max_context
    else:
        ctx = min(int(limit), cap) if limit else cap
    images = max_images if max_images is not None else int(family_limits.get("max_images", 1))
    name = Path(source.rstrip("/")).name if Path(source).expanduser().is_dir() else source.split("/")[-1]
    data = {
        "name": name,
        "family": family,
        "description": f"{source} (no recipe: limits from the checkpoint and mmexport's defaults)",
        "source": {"model": str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else source},
        "limits": {"max_images": images, "max_context": ctx, "max_new_tokens": min(int(defaults["limits"]["max_new_tokens"]), ctx // 2)},
        "export": dict(defaults["export"]),
        "tolerances": defaults["tolerances"],
    }
    return parse_recipe(data, name)
