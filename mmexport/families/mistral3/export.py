"""Mistral 3 (Method A: image tokens in the decoder's input), export side.

Components, each exported on its own:
  vision_encoder  one image's patches on its grid [grid_h, grid_w, 3*p*p] -> the Pixtral tower's hidden states
                  [grid_h, grid_w, width] at `vision_feature_layer` (a list: concatenated). Patch embedding as a
                  MatMul, ln_pre, the checkpoint's own PixtralAttentionLayers (no mask: one image per call,
                  every patch attends to every other); the 2D rotary tables come from the host. grid_h and
                  grid_w are the graph's dynamic dims: no per-image sizes are baked in.
  projector       Mistral3MultiModalProjector for one image: RMSNorm, the patch merger (the unfold of
                  merge x merge neighbours written as reshape/permute over the dynamic grid, so the split sizes
                  transformers computes from `image_sizes` are never traced), merging_layer, linear_1, GELU,
                  linear_2 -> image_embeds [(grid_h/merge)*(grid_w/merge), hidden], row-major.
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder (families/decoder.py) over the Mistral text stack, 1D positions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import PixtralImageParams
from .reference import Mistral3Reference
from .runtime import rotary_tables

# The first special tokens of Mistral's Tekken vocabulary, in id order (Mistral-Small-3.1's tokenizer.json).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                  "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

IMAGE_TOKENS = {"image": "[IMG]", "image_break": "[IMG_BREAK]", "image_end": "[IMG_END]"}  # PixtralProcessor's defaults

# mistralai/Mistral-Small-3.1-24B-Instruct-2503's chat template (the -hf processor's), verbatim.
CHAT_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}\n{%- set default_system_message = \"You are Mistral Small 3, a Large "
    "Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was last "
    "updated on 2023-10-01. The current date is \" + today + \".\\n\\nWhen you're not sure about some information, you say "
    "that you don't have the information and don't make up anything.\\nIf the user's question is not clear, ambiguous, or "
    "does not provide enough context for you to accurately answer the question, you do not try to answer it right away and "
    "you rather ask the user to clarify their request (e.g. \\\"What are some good restaurants around me?\\\" => \\\"Where are "
    "you?\\\" or \\\"When is the next flight to Tokyo\\\" => \\\"Where do you travel from?\\\")\" %}\n\n{{- bos_token }}\n\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- if messages[0] is string %}\n        {%- set system_message = "
    "messages[0]['content'] %}\n        {%- set loop_messages = messages[1:] %}\n    {%- else %} \n        {%- set "
    "system_message = messages[0]['content'][0]['text'] %}\n        {%- set loop_messages = messages[1:] %}\n    {%- endif %}\n"
    "{%- else %}\n    {%- set system_message = default_system_message %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n\n{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n            {%- if message['content'] is string %}\n            {{- '[INST]' + "
    "message['content'] + '[/INST]' }}\n            {%- else %}\n                    {{- '[INST]' }}\n                    "
    "{%- for block in message['content'] %}\n                            {%- if block['type'] == 'text' %}\n"
    "                                    {{- block['text'] }}\n                            {%- elif block['type'] == 'image' "
    "or block['type'] == 'image_url' %}\n                                    {{- '[IMG]' }}\n                                "
    "{%- else %}\n                                    {{- raise_exception('Only text and image blocks are supported in "
    "message content!') }}\n                                {%- endif %}\n                        {%- endfor %}\n"
    "                    {{- '[/INST]' }}\n                {%- endif %}\n    {%- elif message['role'] == 'system' %}\n"
    "        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n    {%- elif message['role'] == 'assistant' %}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] + eos_token }}\n        {%- else %}\n"
    "            {{- message['content'][0]['text'] + eos_token }}\n        {%- endif %}\n    {%- else %}\n        {{- "
    "raise_exception('Only user, system and assistant roles are supported!') }}\n    {%- endif %}\n{%- endfor %}"
)


class _ProcessorConfig:
    """processor_config.json as PixtralProcessor saves it (its class needs torchvision to import)."""

    def __init__(self, patch_size: int, merge: int):
        self.data = {"processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": merge,
                     "image_token": IMAGE_TOKENS["image"], "image_break_token": IMAGE_TOKENS["image_break"],
                     "image_end_token": IMAGE_TOKENS["image_end"]}

    def save_pretrained(self, out_dir) -> None:
        (Path(out_dir) / "processor_config.json").write_text(json.dumps(self.data, indent=2) + "\n")


def feature_layers(config, num_layers: int) -> list[int]:
    """`vision_feature_layer` as indices into the tower's hidden states (0 = ln_pre's output, i = after layer i)."""
    sel = config.vision_feature_layer
    layers = [sel] if isinstance(sel, int) else list(sel)
    return [layer % (num_layers + 1) for layer in layers]


def vision_encoder_module(tower, layers: list[int]):
    """The Pixtral tower for one image: pixel_values [gh, gw, 3*p*p], rotary cos/sin [gh, gw, head_dim] ->
    hidden states [gh, gw, width * len(layers)] (the checkpoint's own layers, ln_pre and patch weights)."""
    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            w = tower.patch_conv.weight.detach()
            self.patch_weight = nn.Parameter(w.reshape(w.shape[0], -1).clone(), requires_grad=False)
            self.ln_pre = tower.ln_pre
            self.layers = tower.transformer.layers[: max(layers)]

        def forward(self, pixel_values, rotary_cos, rotary_sin):
            gh, gw = pixel_values.shape[0], pixel_values.shape[1]
            x = pixel_values.reshape(gh * gw, -1).to(self.patch_weight.dtype) @ self.patch_weight.t()
            x = self.ln_pre(x).unsqueeze(0)  # [1, P, width]
            pos = (rotary_cos.reshape(gh * gw, -1), rotary_sin.reshape(gh * gw, -1))
            states = [x]
            for layer in self.layers:
                x = layer(x, None, position_embeddings=pos)
                states.append(x)
            out = states[layers[0]] if len(layers) == 1 else torch.cat([states[i] for i in layers], -1)
            return out.reshape(gh, gw, -1)

    return VisionEncoder()


def projector_module(projector, merge: int):
    """Mistral3MultiModalProjector for one image: vision_hidden [gh, gw, D] -> image_embeds [gh/m * gw/m, hidden]."""
    from torch import nn

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = projector

        def forward(self, vision_hidden):
            gh, gw, d = vision_hidden.shape
            x = self.p.norm(vision_hidden)
            # torch.nn.functional.unfold(kernel = stride = merge) of the [d, gh, gw] grid, then .t(): one row per
            # merged position (row-major), its features ordered (channel, kernel row, kernel column)
            x = x.reshape(gh // merge, merge, gw // merge, merge, d).permute(0, 2, 4, 1, 3)
            x = self.p.patch_merger.merging_layer(x.reshape((gh // merge) * (gw // merge), d * merge * merge))
            return self.p.linear_2(self.p.act(self.p.linear_1(x)))

    return Projector()


class Mistral3Adapter(Mistral3Reference, FamilyAdapter):
    model_class = "Mistral3ForConditionalGeneration"

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def synthetic_parts(cls, syn: dict[str, Any]):
        """A tiny Mistral 3 from a `[source.synthetic]` table: Mistral3ForConditionalGeneration with seeded weights
        (N(0, init_std), default 0.08), the in-repo BPE tokenizer with Mistral's special tokens and Mistral Small
        3.1's chat template, PixtralImageProcessorPil and processor_config.json."""
        import torch
        from transformers import GenerationConfig, Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        tok = train_bpe_tokenizer(SPECIAL_TOKENS, int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        text = {"model_type": "mistral", "sliding_window": None, **dict(syn["text_config"])}  # TOML has no null
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", False))
        text.update(vocab_size=vocab, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
        vision = {"model_type": "pixtral", **dict(syn["vision_config"])}
        merge = int(syn.get("spatial_merge_size", 2))
        config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids["[IMG]"], spatial_merge_size=merge,
                                vision_feature_layer=syn.get("vision_feature_layer", -1), tie_word_embeddings=tie,
                                projector_hidden_act=syn.get("projector_hidden_act", "gelu"),
                                multimodal_projector_bias=bool(syn.get("multimodal_projector_bias", False)))
        config.text_config.tie_word_embeddings = tie
        torch.manual_seed(int(syn.get("seed", 0)))
        model = Mistral3ForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        with torch.no_grad():  # a wider init than HF's 0.02: greedy parity must not hinge on near-ties
            gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
            for _, p in model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        generation = GenerationConfig(bos_token_id=ids["<s>"], pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"], do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        tokenizer.chat_template = CHAT_TEMPLATE
        patch = int(vision["patch_size"])
        pre = dict(syn.get("preprocessor", {}))
        image_processor = PixtralImageProcessorPil(patch_size={"height": patch, "width": patch}, **pre)
        return model, tokenizer, image_processor, _ProcessorConfig(patch, merge), generation

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 4}

    # -- declarations --------------------------------------------------------------------------
    def _sizes(self, model) -> dict[str, int]:
        vc = model.config.vision_config
        head_dim = getattr(vc, "head_dim", None) or vc.hidden_size // vc.num_attention_heads
        layers = feature_layers(model.config, vc.num_hidden_layers)
        return dict(patch=vc.patch_size, patch_dim=vc.num_channels * vc.patch_size**2, width=vc.hidden_size,
                    features=vc.hidden_size * len(layers), head_dim=head_dim, merge=model.config.spatial_merge_size)

    def _grid_dim(self, name: str, params: PixtralImageParams, merge: int) -> Dim:
        """A side of the patch grid: whole merge blocks, up to what `longest_edge` allows (rounded up to a unit)."""
        most = -(-params.longest_edge // params.unit) * merge
        return Dim(name, merge, max(merge, most // 2 // merge * merge), most, multiple=merge)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        s = self._sizes(model)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        params = self._preprocessor(model, model_dir)
        dims = {"grid_h": self._grid_dim("grid_h", params, s["merge"]), "grid_w": self._grid_dim("grid_w", params, s["merge"])}
        f, grid = "float32", ("grid_h", "grid_w")
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(
                    TensorSpec("pixel_values", f, (*grid, s["patch_dim"]), "one image's patches on its grid (channel, row, column)"),
                    TensorSpec("rotary_cos", f, (*grid, s["head_dim"]), "Pixtral's 2D rotary cos table"),
                    TensorSpec("rotary_sin", f, (*grid, s["head_dim"]), "Pixtral's 2D rotary sin table"),
                ),
                outputs=(TensorSpec("vision_hidden", f, (*grid, s["features"]), "hidden states at vision_feature_layer"),),
                dims=dims,
                doc="Pixtral vision tower, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, (*grid, s["features"])),),
                outputs=(TensorSpec("image_embeds", f, ("num_tokens", tc.hidden_size), "row-major over the merged grid"),),
                dims=dims,
                doc="RMSNorm, patch merger (merge x merge), MLP",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         doc="Mistral decoder over a static KV cache (capacity = context)"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        s = self._sizes(model)
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        gh, gw = self._example_grid(specs["vision_encoder"], s["merge"])
        cos, sin = rotary_tables(gh, gw, s["head_dim"], _vision_theta(model.config.vision_config))
        m = model.model
        vocab = model.config.text_config.vocab_size
        layers = feature_layers(model.config, model.config.vision_config.num_hidden_layers)
        return [
            ExportComponent(specs["vision_encoder"], vision_encoder_module(m.vision_tower, layers).eval(),
                            {"pixel_values": torch.randn(gh, gw, s["patch_dim"], generator=g),
                             "rotary_cos": torch.from_numpy(cos), "rotary_sin": torch.from_numpy(sin)}),
            ExportComponent(specs["projector"], projector_module(m.multi_modal_projector, s["merge"]).eval(),
                            {"vision_hidden": torch.randn(gh, gw, s["features"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(m.language_model.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], m.language_model, model.lm_head).eval(),
                            decoder_example(specs["decoder"])),
        ]

    @staticmethod
    def _example_grid(spec: ComponentSpec, merge: int) -> tuple[int, int]:
        """A non-square grid off the opt sizes, neither side 1 merge block (the tracer would specialize it)."""
        dh, dw = spec.dims["grid_h"], spec.dims["grid_w"]
        pick = [v for v in range(2 * merge, dh.max + 1, merge) if v != dh.opt]
        if len(pick) < 2:
            raise UserError(f"the vision grid range {dh.min}-{dh.max} is too small to trace an example image")
        return pick[0], pick[1] if pick[1] != dw.opt else pick[-1]

    # -- runtime configuration -----------------------------------------------------------------
    @staticmethod
    def _preprocessor(model, model_dir: Path) -> PixtralImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return PixtralImageParams.from_preprocessor_config(json.loads(p.read_text()), model.config.vision_config.patch_size,
                                                           model.config.spatial_merge_size)

    @staticmethod
    def _token_strings(model_dir: Path) -> dict[str, str]:
        p = model_dir / "processor_config.json"
        cfg = json.loads(p.read_text()) if p.is_file() else {}
        return {k: cfg.get(f"{k}_token", v) for k, v in IMAGE_TOKENS.items()}

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        tc = cfg.text_config
        s = self._sizes(model)
        names = self._token_strings(model_dir)
        return {
            "image": self._preprocessor(model, model_dir).to_dict(),
            "vision": {"head_dim": s["head_dim"], "rope_theta": _vision_theta(cfg.vision_config), "patch_size": s["patch"],
                       "spatial_merge_size": s["merge"]},
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "num_kv_heads": tc.num_key_value_heads,
                     "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads, "vocab_size": tc.vocab_size},
            "tokens": {"image_token_id": cfg.image_token_id},
            "token_strings": names,
            "image_token": names["image"],
        }


def _vision_theta(vc) -> float:
    rp = getattr(vc, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(vc, "rope_theta", 10000.0)))
