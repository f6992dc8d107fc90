"""The export-side contract of a model family: every hook that build, verify, bench and taskeval call.

A family package (mmexport/families/NAME/) registers a `Family` descriptor in mmexport/families/__init__.py;
its adapter subclasses `FamilyAdapter` below, and its torch-free runtime subclasses one of the strategies in
mmexport/runtime/methods.py. Generic code only calls these hooks; it never names a family.

Importing this module imports no torch (adapters import it when they load or export a model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from ..recipes import Recipe
from ..spec import ComponentSpec, Dim, TensorSpec


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
    """The decoder's static KV cache, declared once for every family.

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


def text_cache(text_config, limits: Any, layers: Sequence[int] | None = None) -> StaticKVCache:
    """The static cache of a Hugging Face text config (every layer unless `layers` says which), sized by a
    recipe's limits (context and batch rows; a bare int is a context for one row)."""
    capacity, max_batch = (limits, 1) if isinstance(limits, int) else (limits.max_context, limits.max_batch)
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return StaticKVCache(list(range(text_config.num_hidden_layers)) if layers is None else list(layers), kv, head_dim,
                         capacity, max_batch=max_batch)


class FamilyAdapter:
    """Base class of the family adapters: the whole contract, with generic defaults where one exists.

    Checkpoints   synthetic_parts / make_synthetic, check_checkpoint, load, default_limits
    Export        specs, components, runtime_config
    Reference     reference_inputs, reference_outputs, reference_generate (verify, taskeval, bench)
    Verify        verify_components (each component on the reference's own inputs)
    Bench         eager_stage_modules (which transformers modules are the vision / projector stages)
    """

    family: str = ""  # set by the registry
    model_types: tuple[str, ...] = ()  # accepted config.json `model_type` values (set by the registry)
    model_class: str = ""  # the transformers class `load` instantiates
    # the chat template a build uses when the checkpoint ships none (a family whose processor lays the prompt
    # out itself, e.g. Fuyu); None: the runtime then needs --raw-prompt
    default_chat_template: str | None = None

    def chat_template_for(self, model_dir: Path) -> str | None:
        """The chat template a build writes when the checkpoint ships none (default: `default_chat_template`; a
        family whose prompt format depends on the checkpoint, e.g. PaliGemma's image token count, overrides it)."""
        return self.default_chat_template

    # -- checkpoints ---------------------------------------------------------------------------
    def synthetic_parts(self, syn: dict[str, Any]) -> Sequence[Any]:
        """A fresh tiny checkpoint from a recipe's `[source.synthetic]` table: objects with `save_pretrained`
        (model, tokenizer, image processor, generation config)."""
        raise NotImplementedError

    def make_synthetic(self, recipe: Recipe, out_dir: Path) -> None:
        for part in self.synthetic_parts(recipe.synthetic or {}):
            part.save_pretrained(out_dir)

    def check_checkpoint(self, model_dir: Path) -> dict[str, Any]:
        """config.json of `model_dir`, after checking it is of this family's architecture."""
        cfg = read_config(model_dir)
        mt = cfg.get("model_type")
        if mt not in self.model_types:
            raise UserError(
                f"{model_dir}: checkpoint architecture {mt!r} does not match recipe family {self.family!r} "
                f"(expects model_type {' or '.join(self.model_types)})"
            )
        return cfg

    def load(self, model_dir: Path):
        """The checkpoint as a float32 transformers model in eval mode (eager attention: the reference)."""
        self.check_checkpoint(model_dir)
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress belongs to mmexport's own stage display
        cls = getattr(transformers, self.model_class)
        model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
        return model.eval()

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        """Limits for `mmexport build CHECKPOINT` without a recipe: images per prompt (context comes from the config)."""
        return {"max_images": 4}

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

    # -- references ----------------------------------------------------------------------------
    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """What the family's own transformers processor makes of a chat and its images (torch tensors)."""
        raise NotImplementedError

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        """Reference values verify compares with: at least `input_ids` [S] and first-token `logits` [vocab],
        plus whatever `verify_components` reads."""
        raise NotImplementedError

    def reference_generate(self, model, inputs: dict[str, Any], n: int) -> list[int]:
        """transformers' greedy `generate`: the new token ids."""
        import torch

        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def verify_components(self, pipe, prep, ref: dict[str, Any], case: str, tol_for: Callable[[str], Any]) -> list:
        """Each exported component on the reference's own inputs (so errors do not compound): a list of
        verify.Comparison / verify.Check."""
        raise NotImplementedError

    # -- bench ---------------------------------------------------------------------------------
    def eager_stage_modules(self, model) -> dict[str, Any]:
        """Which modules of the transformers model are the "vision" and "projector" stages (bench times them
        with forward hooks inside `generate`; a projector nested in the vision module is subtracted)."""
        return {}


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, or one line saying why not."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise UserError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: not a JSON object")
    return cfg
