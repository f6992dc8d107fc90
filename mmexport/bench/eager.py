"""The eager side of `mmexport bench --vs-pytorch`: transformers' model on the same request, timed stage by
stage with no family code (the family names its vision and projector modules; `generate` does the rest).
torch is imported when a side is prepared, never by importing this module."""
from __future__ import annotations

import gc
import time
from typing import Any

from ..errors import UserError
from .results import SideResult
from .sides import Side


def require_torch() -> None:
    """Raise UserError unless torch and transformers are installed (without importing them)."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--vs-pytorch needs {' and '.join(missing)} (pip install -e '.[export]')")


def eager_request(model, adapter, model_dir, messages, images, new_tokens: int) -> dict[str, Any]:
    """One request through transformers' eager model: its processor (`reference_inputs`), then its own greedy
    `generate` for exactly `new_tokens` tokens (EOS does not stop it). Forward hooks time the family's vision
    and projector modules; a forward hook on the model notes when each step's logits are ready."""
    import torch
    from transformers import GenerationConfig

    stage_modules = adapter.eager_stage_modules(model)
    spent = {k: 0.0 for k in stage_modules}
    started: dict[str, float] = {}
    hooks = []
    for name, module in stage_modules.items():
        hooks.append(module.register_forward_pre_hook(lambda _m, _i, n=name: started.__setitem__(n, time.perf_counter())))
        hooks.append(module.register_forward_hook(lambda _m, _i, _o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - started[n])))
    steps: list[float] = []
    # each step's logits are ready when the model's forward returns (a forward hook, not a logits processor: some
    # models' generate does not pass a logits_processor on, e.g. Janus in its text mode)
    hooks.append(model.register_forward_hook(lambda _m, _i, _o: steps.append(time.perf_counter())))

    config = GenerationConfig.from_dict({**model.generation_config.to_dict(), "do_sample": False, "max_new_tokens": new_tokens,
                                         "min_new_tokens": 0, "eos_token_id": None})
    try:
        t0 = time.perf_counter()
        inputs = adapter.reference_inputs(model, model_dir, messages, images)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=config)
        t_end = time.perf_counter()
    finally:
        for h in hooks:
            h.remove()
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    vision, projector = spent.get("vision", 0.0), spent.get("projector", 0.0)
    if "vision" in stage_modules and "projector" in stage_modules and any(m is stage_modules["projector"] for m in stage_modules["vision"].modules()):
        vision -= projector  # the projector runs inside the vision module (Qwen2-VL's merger)
    decode = steps[-1] - steps[0]
    return {
        "preprocess": (t1 - t0) * 1e3,
        "vision": vision * 1e3,
        "projector": projector * 1e3,
        "prefill": (steps[0] - t1 - vision - projector) * 1e3,
        "ttft": (steps[0] - t0) * 1e3,
        "decode": decode * 1e3,
        "total": (t_end - t0) * 1e3,
        "tok_s": (len(tokens) - 1) / decode if len(tokens) > 1 and decode > 0 else 0.0,
        "tokens": tokens,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "notes": ["transformers' greedy generate (EOS not stopping it); vision and projector timed by forward hooks"
                  + (" (the projector subtracted from the vision module that contains it)" if projector and vision != spent.get("vision") else "")
                  + ", prefill until the first logits, decode from the first to the last logits"],
    }


class EagerSide(Side):
    label = "eager"

    def __init__(self, ours: _OursSide, images, prompt: str, new_tokens: int, model: str | None, log):
        super().__init__(log)
        from ..runtime.prompt import user_message

        self.ours, self.images, self.new_tokens, self.model = ours, images, new_tokens, model
        self.messages = user_message(prompt, len(images))
        self.tm = None
        self.reference: dict[str, Any] = {}
        self.memo = False
        self._stack = None

    def _prepare(self) -> None:
        import torch  # noqa: F401  (the baseline includes torch, as ours includes onnxruntime)

        from ..checkpoints import reference_checkpoint

        m = self.ours.manifest
        assert m is not None, "the exported side is loaded first"
        _recipe, self.adapter, self.model_dir, same = reference_checkpoint(m.data, self.model, log=self.log)
        self.reference = {"checkpoint": str(self.model_dir), "same_as_build": same}
        if not same:
            self.log(f"warning: {self.model_dir} is not the checkpoint this build was exported from")

    def _load(self) -> None:
        import contextlib

        import torch

        from ..checkpoints import memoized_from_pretrained

        self.tm = self.adapter.load(self.model_dir)
        self.log(f"pytorch eager: {self.model_dir} (float32, attn eager, {torch.get_num_threads()} threads)")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())  # per thread: runs happen on this one
        self.memo = self._stack.enter_context(memoized_from_pretrained())
        self.adapter.reference_inputs(self.tm, self.model_dir, self.messages, self.images)  # loads the tokenizer / processor once

    def _run(self) -> dict[str, Any]:
        return eager_request(self.tm, self.adapter, self.model_dir, self.messages, self.images, self.new_tokens)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        if self.tm is not None:
            self.tm = None
            gc.collect()

    def result(self, interleaved: bool) -> SideResult:
        out = self.last
        timings, tok_s = self.stats()
        return SideResult(
            name="pytorch eager (fp32)",
            timings_ms=timings,
            tokens_per_s=tok_s,
            tokens_generated=len(out["tokens"]),
            prompt_tokens=out["prompt_tokens"],
            token_ids=out["tokens"],
            memory=self.memory(interleaved),
            load_s=self.load_s,
            notes=["preprocess: transformers tokenizer + image processor" + (" (loaded once, outside the timing)" if self.memo else " (including from_pretrained)"),
                   *out.get("notes", []),
                   "memory baseline: the RSS before this model was loaded, in the same process"
                   + (" (the exported model loaded too: the runs are interleaved)" if interleaved else " (the exported model already released)")],
        )
