"""The one generic decoder (mmexport/families/decoder.py) against transformers, on text stacks of several
architectures: each tiny causal LM is exported through `StaticCacheDecoder` (its own layers, attention swapped
for the static-cache function), run in ONNX Runtime — a prompt on the empty cache, then decode steps on the
preallocated cache, as the runtime runs it — and compared with transformers' forward on the same tokens.

The stacks cover what the attention function must do itself: grouped-query heads, q/k norms (Qwen3), biases
(Qwen2), fused projections and partial rotary (Phi-3, Persimmon), sliding windows shorter than the prompt
(Mistral, Gemma 2/3, every layer or alternating), soft-capped scores and logits (Gemma 2), Gemma 3's local
and global rotary; plus bidirectional image blocks against transformers' own block mask.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmexport.export.onnx_export import export_component  # noqa: E402
from mmexport.families.base import ExportComponent, text_cache  # noqa: E402
from mmexport.families.decoder import StaticCacheDecoder, decoder_example, decoder_spec  # noqa: E402
from mmexport.runtime.backends import OrtRunner  # noqa: E402
from mmexport.runtime.pipeline import KVCache  # noqa: E402

CTX = 32
PROMPT, STEPS = 11, 4  # the prompt is longer than every sliding window below
SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)

STACKS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", {"num_key_value_heads": 4, "qk_layernorm": True,
                                                               "partial_rotary_factor": 0.5}),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 4, "attn_logit_softcapping": 5.0,
                                                             "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 20,
                                                             "head_dim": 16}),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 6, "head_dim": 16,
                                                              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


def _model(name: str):
    cfg_cls, model_cls, extra = STACKS[name]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # wider than HF's 0.02 init, so logits are well spread
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _export(model, tmp_path, extra_inputs=()):
    cfg = model.config
    spec = decoder_spec(text_cache(cfg, CTX), cfg.hidden_size, cfg.vocab_size, positions="1d", extra_inputs=extra_inputs)
    module = StaticCacheDecoder(spec, model.model, model.lm_head, getattr(cfg, "final_logit_softcapping", None)).eval()
    path = export_component(ExportComponent(spec, module, decoder_example(spec)), tmp_path, 18, log=lambda m: None)
    return spec, OrtRunner(path, spec).activate()


def _run(spec, runner, embeds: np.ndarray, extra=None) -> list[np.ndarray]:
    """Logits after the prompt and after each decode step, through the runtime's static cache."""
    cache = KVCache(spec)
    out = []

    def step(e: np.ndarray, start: int, feeds: dict) -> np.ndarray:
        pos = np.arange(start, start + e.shape[1], dtype=np.int64)[None]
        res = runner.infer({"inputs_embeds": np.ascontiguousarray(e), "position_ids": pos, **feeds, **cache.feeds()})
        cache.append(res)
        return res["logits"][0, -1]

    out.append(step(embeds[:, :PROMPT], 0, {n: v[:, :PROMPT] for n, v in (extra or {}).items()}))
    for k in range(STEPS):
        more = {n: v[:, PROMPT + k:PROMPT + k + 1] for n, v in (extra or {}).items()}
        out.append(step(embeds[:, PROMPT + k:PROMPT + k + 1], PROMPT + k, more))
    return out


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stack_matches_transformers(name, tmp_path):
    model = _model(name)
    spec, runner = _export(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        ref = model(input_ids=ids).logits[0]  # every position, no cache: transformers' own masks
    got = _run(spec, runner, embeds.numpy())
    for k, logits in enumerate(got):
        want = ref[PROMPT - 1 + k].numpy()
        assert np.abs(logits - want).max() < 1e-4, (name, k, np.abs(logits - want).max())
        assert int(np.argmax(logits)) == int(np.argmax(want))
    runner.deactivate()


def test_sliding_window_really_masks(tmp_path):
    """The same Mistral weights with the window off give other logits once the prompt is longer than the
    window: the window is applied, not ignored."""
    model = _model("mistral-sliding")
    spec, runner = _export(model, tmp_path)
    ids = torch.randint(0, 160, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids).numpy()
        model.config.sliding_window = None
        unwindowed = model(input_ids=ids).logits[0, PROMPT - 1].numpy()
    windowed = _run(spec, runner, embeds)[0]
    assert np.abs(windowed - unwindowed).max() > 1e-2


def test_bidirectional_image_blocks_match_transformers_block_mask(tmp_path):
    """`image_block_ids` (> 0: tokens of one image) lets an image's tokens see each other, causal elsewhere,
    as transformers' blockwise overlay on the causal mask (Gemma 3's image tokens)."""
    from transformers.masking_utils import create_causal_mask

    from mmexport.spec import TensorSpec

    model = _model("llama")
    blocks_spec = TensorSpec("image_block_ids", "int64", ("batch", "seq_len"), "tokens of one image share an id > 0")
    spec, runner = _export(model, tmp_path, extra_inputs=(blocks_spec,))
    n = PROMPT + STEPS
    blocks = np.zeros((1, n), dtype=np.int64)
    blocks[0, 2:6] = 1  # an image of 4 tokens
    blocks[0, 7:10] = 2  # another of 3
    ids = torch.randint(0, 160, (1, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        bt = torch.from_numpy(blocks)

        def same_block(b, h, q, kv):
            return (bt[b, q] == bt[b, kv]) & (bt[b, q] > 0)

        mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                                  cache=None, position_ids=torch.arange(n)[None], or_mask_function=same_block)
        ref = model(inputs_embeds=embeds, attention_mask=mask).logits[0]
        causal = model(inputs_embeds=embeds).logits[0]
    got = _run(spec, runner, embeds.numpy(), extra={"image_block_ids": blocks})
    for k, logits in enumerate(got):
        assert np.abs(logits - ref[PROMPT - 1 + k].numpy()).max() < 1e-4, k
    # the blocks change the result (a token before the end of an image sees that image's later tokens)
    assert np.abs(ref[3].numpy() - causal[3].numpy()).max() > 1e-3
