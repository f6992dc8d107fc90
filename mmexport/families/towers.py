"""Fixed-size ViT towers (CLIP, SigLIP, ...) + a projector + image tokens that replace placeholders: the export side
shared by LLaVA-1.5, PaliGemma, Gemma 3 and the families built like them (LLaVA-OneVision's tiles, Janus, ...).
The torch-free runtime half is families/towers_runtime.py (`TowerRuntime`, `FixedImageParams`).

Components (declared once, by `TowerAdapter.specs`):

  vision_encoder  pixel_values [num_images, C, H, W] -> vision_hidden [num_images, P, D]
                  embeddings, optional pre-norm, the encoder layers up to the deepest selected one, then the
                  selected hidden states (`feature_layers`; None = the final output after the post-norm), the
                  class token dropped or not (`drop_cls`), several layers concatenated along D. `num_images` is a
                  real dynamic dim (1..max(2, max_images)): the graph is traced with 2 pictures and the build runs
                  it in ONNX Runtime at another count (export/shapecheck.py); nothing loops over images in the
                  graph (transformers' get_image_features traced with two images bakes the count in).
  projector       vision_hidden [num_images, P, D] -> image_embeds [num_images, T, hidden] (the checkpoint's own
                  projector module: LLaVA's MLP, PaliGemma's linear, Gemma 3's avg-pool + RMSNorm + matmul).
  embed_tokens    the checkpoint's embedding (scaling included).
  decoder         the generic decoder (families/decoder.py), 1D positions; with `attention_blocks` != "none" an
                  extra input image_block_ids [batch, seq_len] (> 0: bidirectional within the block).

Hooks a family overrides (each has a default for the LLaVA layout `model.model.{vision_tower,
multi_modal_projector, language_model}`):

  vision_tower(model)             the transformers vision model (CLIPVisionModel, SiglipVisionModel, ...): it must
                                  have `embeddings`, `encoder.layers`, optional `pre_layrnorm` / `post_layernorm`
  feature_layers(model)           hidden-state indices to take (0 = embeddings; negatives count from the end), or
                                  None for the tower's final output (post-norm applied)
  drop_cls(model)                 drop the first (class) token of each selected state
  projector(model)                the module mapping [N, P, D] -> [N, T, hidden]
  tokens_per_image(model)         T (the placeholder count per picture)
  image_processor_class           "module:Class" of transformers' PIL image processor: its class attributes are the
                                  defaults of keys missing from preprocessor_config.json (image_params parses it)
  attention_blocks(model)         "none" | "image" (one block per run of image tokens: Gemma 3) | "prompt" (the whole
                                  prompt is one bidirectional block: PaliGemma's prefix-LM)
  position_offset(model)          added to 0-based positions (PaliGemma: 1)
  window_limits_blocks(model)     sliding windows also cut bidirectional blocks (Gemma 3) or not (PaliGemma)
  special_tokens_rule             "unless_bos" (tokenize with the tokenizer's special tokens unless the rendered
                                  prompt starts with BOS, as processor.apply_chat_template) | "never"
  chat_template_for(model_dir)    (FamilyAdapter's) a prompt format the build writes for checkpoints without a
                                  chat template (PaliGemma)
  image_sequence(model)           what a placeholder expands to: {"before", "token", "after"} (Gemma 3's
                                  "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n"), None = the token repeated
  extra_eos_tokens                more stop tokens of a synthetic checkpoint's generation config
  reference_text / processor      the transformers processor path the reference goes through (reference side)
  synthetic_config(syn, ids, vocab) the transformers config of a seeded tiny checkpoint (`synthetic_parts`)
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..recipes import Recipe
from ..spec import ComponentSpec, Dim, TensorSpec
from ..synthetic import train_bpe_tokenizer
from .base import ExportComponent, FamilyAdapter, text_cache
from .checks import method_a_checks
from .towers_runtime import FixedImageParams


def vision_tower_module(vision, layers: Sequence[int] | None, drop_cls: bool):
    """pixel_values [N, C, H, W] -> [N, P, D] from a CLIP/SigLIP-style vision model (see the module docstring)."""
    import torch
    from torch import nn

    class VisionTower(nn.Module):
        def __init__(self):
            super().__init__()
            n = len(vision.encoder.layers)
            self.embeddings = vision.embeddings
            self.pre = getattr(vision, "pre_layrnorm", None)
            self.indices = None if layers is None else [i % (n + 1) for i in layers]
            depth = n if self.indices is None else max(self.indices)
            self.layers = nn.ModuleList(list(vision.encoder.layers)[:depth])
            self.post = vision.post_layernorm if self.indices is None else None
            self.drop_cls = drop_cls
            self.dtype = next(vision.parameters()).dtype

        def forward(self, pixel_values):
            h = self.embeddings(pixel_values.to(self.dtype))
            if self.pre is not None:
                h = self.pre(h)
            states = [h]
            for layer in self.layers:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
                states.append(h)
            feats = [self.post(h)] if self.indices is None else [states[i] for i in self.indices]
            if self.drop_cls:
                feats = [f[:, 1:] for f in feats]
            return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    return VisionTower()


def reference_tower_features(vision, pixel_values, layers: Sequence[int] | None, drop_cls: bool):
    """The same selection from transformers' own forward (output_hidden_states), for verify and the tests."""
    import torch

    out = vision(pixel_values, output_hidden_states=True, return_dict=True)
    feats = [out.last_hidden_state] if layers is None else [out.hidden_states[i] for i in layers]
    if drop_cls:
        feats = [f[:, 1:] for f in feats]
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


class TowerReference:
    """transformers' processor and model as the reference (verify, taskeval, bench, tests); torch when used."""

    processor_class = ""  # "transformers:LlavaProcessor"
    image_processor_class = ""  # "module:Class" of the PIL image processor

    def image_processor(self, model_dir: Path):
        module, cls = self.image_processor_class.split(":")
        return getattr(importlib.import_module(module), cls).from_pretrained(model_dir, local_files_only=True)

    def processor(self, model, model_dir: Path):
        """(hook) The family's transformers processor, from the tokenizer and the PIL image processor."""
        raise NotImplementedError

    def reference_text(self, proc, messages: list[dict[str, Any]], images: list[Any]) -> tuple[str, dict[str, Any]]:
        """(hook) The rendered prompt and the processor kwargs, as processor.apply_chat_template(tokenize=True) does:
        no special tokens added when the template already wrote the BOS."""
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = proc.tokenizer.bos_token
        return text, {"add_special_tokens": not (bos is not None and text.startswith(bos))}

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        proc = self.processor(model, model_dir)
        text, kw = self.reference_text(proc, messages, images)
        if images:
            out = dict(proc(images=list(images), text=text, return_tensors="pt", **kw))
        else:
            out = dict(proc.tokenizer(text, return_tensors="pt", **kw))
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}

    def image_feature_kwargs(self, model) -> dict[str, Any]:
        """(hook) Keyword arguments of transformers' get_image_features (LLaVA: its feature layer and strategy)."""
        return {}

    def reference_features(self, model, pixel_values):
        """(vision_hidden [N, P, D], image_embeds [N, T, hidden]) by transformers' own modules."""
        import torch

        vision = reference_tower_features(self.vision_tower(model), pixel_values, self.feature_layers(model), self.drop_cls(model))
        feats = model.model.get_image_features(pixel_values=pixel_values, **self.image_feature_kwargs(model)).pooler_output
        embeds = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return vision, embeds.reshape(pixel_values.shape[0], -1, embeds.shape[-1])

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy()}
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                pv = inputs["pixel_values"]
                vision, image_embeds = self.reference_features(model, pv)
                ref["pixel_values"] = [p.numpy() for p in torch.split(pv, 1)]
                ref["vision_encoder"] = [v.numpy() for v in torch.split(vision, 1)]
                ref["projector"] = [e.numpy() for e in torch.split(image_embeds, 1)]
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, image_embeds.reshape(-1, image_embeds.shape[-1]))
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["position_ids"] = (torch.arange(ids.shape[1])[None] + self.position_offset(model)).numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        import numpy as np

        ref = dict(ref)
        if pipe.family.blocks != "none":  # the decoder's block ids, as the runtime derives them from the prompt
            ref["decoder_inputs"] = {"image_block_ids": pipe.family.block_ids(np.asarray(ref["input_ids"]))}
        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": self.vision_tower(model), "projector": self.projector(model)}


class TowerAdapter(TowerReference, FamilyAdapter):
    """A fixed-size ViT family's adapter (see the module docstring for the hooks)."""

    config_class = ""  # transformers config class of a synthetic checkpoint
    image_token = "<image>"
    special_tokens: Sequence[str] = ()
    chat_template: str | None = None
    bos_token: str | None = None  # the synthetic tokenizer adds it (its post-processor) when given
    eos_token = ""
    extra_eos_tokens: Sequence[str] = ()  # generation stops on these too (Gemma 3: <end_of_turn>)
    pad_token = ""
    special_tokens_rule = "unless_bos"

    # -- hooks -------------------------------------------------------------------------------------
    def vision_tower(self, model):
        return model.model.vision_tower

    def feature_layers(self, model) -> list[int] | None:
        return None

    def drop_cls(self, model) -> bool:
        return False

    def projector(self, model):
        return model.model.multi_modal_projector

    def tokens_per_image(self, model) -> int:
        raise NotImplementedError

    def attention_blocks(self, model) -> str:
        return "none"

    def position_offset(self, model) -> int:
        return 0

    def window_limits_blocks(self, model) -> bool:
        """Whether sliding windows also limit the bidirectional blocks (Gemma 3) or blocks reach past them."""
        return False

    def image_defaults(self) -> dict[str, Any]:
        """The PIL image processor class's own defaults (what a key missing from preprocessor_config.json means)."""
        module, cls = self.image_processor_class.split(":")
        c = getattr(importlib.import_module(module), cls)
        keys = ("size", "crop_size", "do_resize", "do_center_crop", "do_pad", "resample", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square", "do_pan_and_scan")
        out = {k: getattr(c, k, None) for k in keys}
        if out["resample"] is not None:
            out["resample"] = int(out["resample"])
        return out

    def image_params(self, model_dir: Path) -> FixedImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return FixedImageParams.from_preprocessor_config(json.loads(p.read_text()), self.image_defaults())

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 4}

    # -- synthetic checkpoints ---------------------------------------------------------------------
    def synthetic_config(self, syn: dict[str, Any], ids: dict[str, int], vocab: int):
        """(hook) The transformers config of a tiny checkpoint."""
        raise NotImplementedError

    def synthetic_tokenizer_kwargs(self, ids: dict[str, int]) -> dict[str, Any]:
        """(hook) Extra PreTrainedTokenizerFast keyword arguments (named special tokens)."""
        return {}

    def synthetic_parts(self, syn: dict[str, Any]):
        """(model, tokenizer, image processor, generation config) of a seeded tiny checkpoint: transformers' own
        config/model classes, the in-repo BPE tokenizer with the family's special tokens (a BOS added by its
        post-processor, as Llama/Gemma tokenizers do) and chat template, the family's PIL image processor."""
        import torch
        import transformers
        from tokenizers import processors
        from transformers import GenerationConfig, PreTrainedTokenizerFast

        tok = train_bpe_tokenizer(list(self.special_tokens), int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in self.special_tokens}
        if self.bos_token:
            tok.post_processor = processors.TemplateProcessing(single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A $B",
                                                               special_tokens=[(self.bos_token, ids[self.bos_token])])
        vocab = max(int(syn.get("text_config", {}).get("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        config = self.synthetic_config(syn, ids, vocab)
        torch.manual_seed(int(syn.get("seed", 0)))
        model = getattr(transformers, self.model_class)._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        with torch.no_grad():  # a wide init: greedy parity must not hinge on near-ties of an untrained model
            gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
            for _name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        eos = [ids[t] for t in (self.eos_token, *self.extra_eos_tokens)]
        generation = GenerationConfig(bos_token_id=ids.get(self.bos_token or ""), pad_token_id=ids[self.pad_token],
                                      eos_token_id=eos, do_sample=False)
        model.generation_config = generation
        kw = dict(eos_token=self.eos_token, pad_token=self.pad_token, **self.synthetic_tokenizer_kwargs(ids))
        if self.bos_token:
            kw["bos_token"] = self.bos_token
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
        if self.chat_template:
            tokenizer.chat_template = self.chat_template
        module, cls = self.image_processor_class.split(":")
        ip = getattr(importlib.import_module(module), cls)(**dict(syn.get("preprocessor", {})))
        return model, tokenizer, ip, generation

    # -- declarations ------------------------------------------------------------------------------
    def _sizes(self, model, model_dir: Path) -> dict[str, Any]:
        vc = model.config.vision_config
        params = self.image_params(model_dir)
        h, w = params.out_size
        if (h, w) != (vc.image_size, vc.image_size):
            raise UserError(f"{model_dir}: the image processor makes {w}x{h} pictures but the vision tower takes "
                            f"{vc.image_size}x{vc.image_size}")
        patches = (vc.image_size // vc.patch_size) ** 2
        layers = self.feature_layers(model)
        P = patches + (0 if self.drop_cls(model) or not self._has_cls(model) else 1)
        D = vc.hidden_size * (1 if layers is None else len(layers))
        return dict(channels=vc.num_channels, size=vc.image_size, P=P, D=D, T=self.tokens_per_image(model),
                    hidden=model.config.text_config.hidden_size)

    def _has_cls(self, model) -> bool:
        return hasattr(self.vision_tower(model).embeddings, "class_embedding")

    def _images_dim(self, recipe: Recipe) -> Dim:
        return Dim("num_images", 1, 1, max(2, recipe.limits.max_images))

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from .decoder import decoder_spec, embed_spec

        s = self._sizes(model, model_dir)
        f, n = "float32", self._images_dim(recipe)
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        extra = []
        if self.attention_blocks(model) != "none":
            extra.append(TensorSpec("image_block_ids", "int64", ("batch", "seq_len"),
                                    "> 0: tokens of one block attend each other bidirectionally; 0: causal"))
        return [
            ComponentSpec("vision_encoder",
                          inputs=(TensorSpec("pixel_values", f, ("num_images", s["channels"], s["size"], s["size"]),
                                             "fixed-size pictures (images or tiles), a batch"),),
                          outputs=(TensorSpec("vision_hidden", f, ("num_images", s["P"], s["D"])),),
                          dims={"num_images": n}, doc="ViT tower (selected hidden states), a batch of pictures"),
            ComponentSpec("projector",
                          inputs=(TensorSpec("vision_hidden", f, ("num_images", s["P"], s["D"])),),
                          outputs=(TensorSpec("image_embeds", f, ("num_images", s["T"], s["hidden"])),),
                          dims={"num_images": n}, doc="multimodal projector, per picture"),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, extra_inputs=extra,
                         doc=f"{getattr(tc, 'model_type', 'text')} decoder over a static KV cache (capacity = context)"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from .decoder import StaticCacheDecoder, decoder_example
        from .parts import EmbedTokens, ModuleCall

        s = self._sizes(model, model_dir)
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        tower = vision_tower_module(self.vision_tower(model), self.feature_layers(model), self.drop_cls(model)).eval()
        lm = model.model.language_model
        vocab = model.config.text_config.vocab_size
        softcap = getattr(model.config.text_config, "final_logit_softcapping", None)
        decoder = StaticCacheDecoder(specs["decoder"], lm, model.lm_head, softcap).eval()
        decoder.window_limits_blocks = self.window_limits_blocks(model)
        return [
            ExportComponent(specs["vision_encoder"], tower, {"pixel_values": torch.randn(2, s["channels"], s["size"], s["size"], generator=g)}),
            ExportComponent(specs["projector"], ModuleCall(self.projector(model)).eval(), {"vision_hidden": torch.randn(2, s["P"], s["D"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], decoder, decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        tc = cfg.text_config
        out = {
            "image": self.image_params(model_dir).to_dict(),
            "image_token": self.image_token,
            "tokens": {"image_token_id": int(cfg.image_token_id)},
            "tokens_per_image": self.tokens_per_image(model),
            "positions": {"offset": self.position_offset(model)},
            "attention": {"blocks": self.attention_blocks(model)},
            "add_special_tokens": self.special_tokens_rule,
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "vocab_size": tc.vocab_size},
        }
        seq = self.image_sequence(model)
        if seq:
            out["image_sequence"] = seq
        return out

    def image_sequence(self, model) -> dict[str, str] | None:
        """(hook) What a placeholder becomes: {"before", "token", "after"} around the image tokens, or None for the
        placeholder token repeated (LLaVA, PaliGemma)."""
        return None
