"""Mixture-of-experts text stacks through the one generic decoder (families/decoder.py), with transformers'
experts function swapped for mmexport's dense one (families/experts.py, registered in transformers' experts
registry): each tiny MoE causal LM is exported, run in ONNX Runtime over a prompt and decode steps on the
static cache, and compared with transformers' own (sparse, routed) forward. The graphs hold no NonZero and
no data-dependent shapes (lint), whatever the routing."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generic_decoder import PROMPT, STEPS, _export, _run  # noqa: E402

SMALL = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)

STACKS = {
    # Aria: experts stored transposed ([E, in, out]), top-k softmax over the chosen logits, shared experts
    "aria": ("AriaTextConfig", "AriaTextForCausalLM", {"intermediate_size": 32, "moe_num_experts": 4, "moe_topk": 2,
                                                        "moe_num_shared_experts": 1}),
    # Mixtral: [E, out, in] experts, softmax over all experts then top-k
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"intermediate_size": 48, "num_local_experts": 5, "num_experts_per_tok": 2}),
    # Qwen3-MoE: renormalized top-k, q/k norms
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 3,
                                                             "norm_topk_prob": True, "head_dim": 16}),
}


def _model(name: str):
    cfg_cls, model_cls, extra = STACKS[name]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", sorted(STACKS))
def test_moe_stack_matches_transformers(name, tmp_path):
    import onnx

    model = _model(name)
    assert model.config._experts_implementation != "mmexport_dense"
    spec, runner = _export(model, tmp_path)
    assert model.config._experts_implementation != "mmexport_dense"  # switched for the export only
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        ref = model(input_ids=ids).logits[0]  # transformers' routed experts
    got = _run(spec, runner, embeds.numpy())
    for k, logits in enumerate(got):
        want = ref[PROMPT - 1 + k].numpy()
        assert np.abs(logits - want).max() < 1e-4, (name, k, np.abs(logits - want).max())
    runner.deactivate()
    ops = {n.op_type for n in onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False).graph.node}
    assert not ops & {"NonZero", "Loop", "If", "ScatterND", "ScatterElements", "Unique"}, ops
    assert "TopK" in ops


def test_dense_experts_follow_the_router(tmp_path):
    """The combination really uses the router's choice: the same Aria weights with top-1 routing give other logits
    in transformers, and the export follows (dense over all experts, weighted 0 where not chosen)."""
    model = _model("aria")
    ids = torch.randint(0, 160, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        top2 = model(input_ids=ids).logits[0, PROMPT - 1].numpy()
        for layer in model.model.layers:
            layer.mlp.router.top_k = 1
        top1 = model(input_ids=ids).logits[0, PROMPT - 1].numpy()
    assert np.abs(top1 - top2).max() > 1e-2
    spec, runner = _export(model, tmp_path)
    got = _run(spec, runner, embeds.numpy())[0]
    assert np.abs(got - top1).max() < 1e-4
    runner.deactivate()
