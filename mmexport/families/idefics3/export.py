"""Idefics3 (Method A: tile embeddings over the image tokens of an unmodified Llama decoder), export side.

Components, each exported on its own:
  vision_encoder  one image's tiles [tiles, 3, S, S] -> [tiles, P, dim]: patch conv + the learned position
                  embeddings + the encoder layers + post-LayerNorm, full attention inside each tile. Every tile
                  is a full square (image.py), so transformers' patch attention mask is all ones and the
                  position ids are fixed: the graph has no mask, no boolean indexing (transformers drops padding
                  images with `pixel_values[real_images_inds]` and buckets positions from the mask -- NonZero and
                  Bucketize as traced) and no data-dependent shape. The tile count is the dynamic axis.
  projector       the connector: pixel shuffle (space-to-depth, families.parts.pixel_shuffle_tokens) + Linear ->
                  [tiles, image_seq_len, hidden].
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder over the checkpoint's text model (Llama), plain 1D positions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ...synthetic import LLAMA3_SPLIT, train_bpe_tokenizer
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import Idefics3ImageParams

ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *ROW_COL_TOKENS]

# Idefics3-8B-Llama3's chat template (HuggingFaceM4/Idefics3-8B-Llama3, processor chat_template)
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def vision_modules():
    """The torch wrappers (built lazily so importing this module needs no torch)."""
    import torch
    from torch import nn

    from ..parts import pixel_shuffle_tokens

    class VisionEncoder(nn.Module):
        """pixel_values [tiles, 3, S, S] -> vision_hidden [tiles, P, dim] (the checkpoint's own modules)."""

        def __init__(self, vm):
            super().__init__()
            emb = vm.embeddings
            self.patch = emb.patch_embedding
            self.position = emb.position_embedding
            self.layers = vm.encoder.layers
            self.post = vm.post_layernorm
            # transformers' position ids of a full tile (it buckets fractional coordinates of the patch mask;
            # for a full mask they are fixed): captured from its own embeddings module, once
            got: list[Any] = []
            hook = emb.position_embedding.register_forward_hook(lambda _m, args, _out: got.append(args[0]))
            side = vm.config.image_size
            with torch.no_grad():
                emb(torch.zeros(1, 3, side, side), torch.ones(1, side // vm.config.patch_size, side // vm.config.patch_size, dtype=torch.bool))
            hook.remove()
            self.register_buffer("position_ids", got[0][0].clone(), persistent=False)

        def forward(self, pixel_values):
            x = self.patch(pixel_values.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)
            x = x + self.position(self.position_ids)
            for layer in self.layers:
                x = layer(x, None)
            return self.post(x)

    class Projector(nn.Module):
        """vision_hidden [tiles, P, dim] -> image_embeds [tiles, P / scale^2, hidden]."""

        def __init__(self, connector):
            super().__init__()
            self.scale = int(connector.scale_factor)
            self.proj = connector.modality_projection

        def forward(self, vision_hidden):
            return self.proj(pixel_shuffle_tokens(vision_hidden, self.scale))

    return VisionEncoder, Projector


class Idefics3Reference:
    """transformers' processor (tokenizer + PIL image processor) and model as verify's reference."""

    processor_class = "transformers:Idefics3Processor"
    image_processor_class = "transformers.models.idefics3.image_processing_pil_idefics3:Idefics3ImageProcessorPil"

    @staticmethod
    def _load(ref: str):
        import importlib

        module, cls = ref.split(":")
        return getattr(importlib.import_module(module), cls)

    def processor(self, model, model_dir: Path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ip = self._load(self.image_processor_class).from_pretrained(model_dir, local_files_only=True)
        self._remember_tokens(tok)
        return self._load(self.processor_class)(image_processor=ip, tokenizer=tok, image_seq_len=image_seq_len(model.config))

    def _remember_tokens(self, tok) -> None:
        """The ids reference_outputs reads the tiles of each image by (set by `load` and `processor`)."""
        self._token_ids = {t: tok.convert_tokens_to_ids(t) for t in ("<global-img>", "<fake_token_around_image>")}

    def reference_inputs(self, model, model_dir: Path, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        proc = self.processor(model, model_dir)
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = proc(images=list(images) or None, text=text, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}

    @staticmethod
    def tiles_per_image(ids, image_token_id: int, global_token_id: int, seq_len: int) -> list[int]:
        """Each image's tile count read off the expanded prompt: runs of image tokens (seq_len each, one per
        tile), an image ending with the run after its `<global-img>`."""
        counts, runs, prev = [], 0, None
        i = 0
        while i < len(ids):
            if ids[i] == image_token_id:
                j = i
                while j < len(ids) and ids[j] == image_token_id:
                    j += 1
                runs += (j - i) // seq_len
                if prev == global_token_id:
                    counts.append(runs)
                    runs = 0
                i, prev = j, image_token_id
            else:
                prev = ids[i]
                i += 1
        return counts

    def reference_outputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = inputs["input_ids"]
        ref: dict[str, Any] = {"input_ids": ids[0].numpy(), "position_ids": torch.arange(ids.shape[1])[None].numpy()}
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(ids)
            ref["embed_tokens"] = embeds.numpy()
            if "pixel_values" in inputs:
                feats = model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"), return_dict=True)
                seq = image_seq_len(model.config)
                counts = self.tiles_per_image(ids[0].tolist(), model.config.image_token_id, self._global_token_id, seq)
                tiles = inputs["pixel_values"][0]
                ref["pixel_values"] = [t.numpy() for t in torch.split(tiles, counts)]
                ref["vision_encoder"] = [h.numpy() for h in torch.split(feats.last_hidden_state, counts)]
                flat = feats.pooler_output[0]
                ref["projector"] = [e.numpy() for e in torch.split(flat, [c * seq for c in counts])]
                mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, flat)
            ref["decoder_inputs_embeds"] = embeds.numpy()
            ref["logits"] = model(**inputs).logits[0, -1].numpy()
        return ref

    def verify_components(self, pipe, prep, ref, case, tol_for) -> list:
        from ..checks import method_a_checks

        return method_a_checks(pipe, prep, ref, case, tol_for)

    def eager_stage_modules(self, model) -> dict[str, Any]:
        return {"vision": model.model.vision_model, "projector": model.model.connector}


def image_seq_len(config) -> int:
    """Image tokens per tile: (image_size / patch_size)^2 / scale_factor^2 (the processors' image_seq_len)."""
    vc = config.vision_config
    return int((vc.image_size // vc.patch_size) ** 2 / config.scale_factor**2)


class Idefics3Adapter(Idefics3Reference, FamilyAdapter):
    model_class = "Idefics3ForConditionalGeneration"
    config_class = "Idefics3Config"
    image_processor_save_class = "transformers.models.idefics3.image_processing_pil_idefics3:Idefics3ImageProcessorPil"
    special_tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", *IMAGE_TOKENS]
    bos, eos, pad = "<|begin_of_text|>", ["<end_of_utterance>", "<|end_of_text|>"], "<|end_of_text|>"
    chat_template = IDEFICS3_CHAT_TEMPLATE

    @property
    def _global_token_id(self) -> int:
        return self._token_ids["<global-img>"]

    def load(self, model_dir: Path):
        model = super().load(model_dir)
        from transformers import AutoTokenizer

        self._remember_tokens(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
        return model

    # -- checkpoints ---------------------------------------------------------------------------
    def synthetic_parts(self, syn: dict[str, Any]):
        import torch
        import transformers
        from transformers import GenerationConfig, PreTrainedTokenizerFast

        tok = train_bpe_tokenizer(list(self.special_tokens), int(syn.get("tokenizer_vocab_size", 1024)), split=LLAMA3_SPLIT)
        ids = {t: tok.token_to_id(t) for t in self.special_tokens}
        eos = [ids[t] for t in self.eos]
        text = dict(syn["text_config"])
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(vocab_size=vocab, bos_token_id=ids[self.bos], eos_token_id=eos, pad_token_id=ids[self.pad], tie_word_embeddings=tie)
        vision = dict(syn["vision_config"])
        config = getattr(transformers, self.config_class)(
            text_config=text, vision_config=vision, scale_factor=int(syn.get("scale_factor", 2)),
            image_token_id=ids["<image>"], tie_word_embeddings=tie, pad_token_id=ids[self.pad])
        seed = int(syn.get("seed", 0))
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)._from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for _, p in model.named_parameters():
                if p.dim() >= 2:  # wider than HF's init: well separated logits for greedy parity
                    p.copy_(torch.randn(p.shape, generator=gen) * float(syn.get("init_std", 0.08)))
        generation = GenerationConfig(bos_token_id=ids[self.bos], pad_token_id=ids[self.pad], eos_token_id=eos, do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=self.bos, eos_token=self.eos[0], pad_token=self.pad)
        tokenizer.chat_template = self.chat_template
        pre = {"max_image_size": {"longest_edge": int(vision["image_size"])}, **dict(syn.get("preprocessor", {}))}
        ip = self._load(self.image_processor_save_class)(**pre)
        return model, tokenizer, ip, generation

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 2}

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> Idefics3ImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return Idefics3ImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def _sizes(self, model, model_dir: Path) -> dict[str, int]:
        vc, tc = model.config.vision_config, model.config.text_config
        pre = self._preprocessor(model_dir)
        if pre.tile != vc.image_size:
            raise UserError(f"{model_dir}: the preprocessor's tiles ({pre.tile} px) are not the vision model's "
                            f"image_size ({vc.image_size} px)")
        side = vc.image_size // vc.patch_size
        return dict(tile=vc.image_size, patches=side * side, dim=vc.hidden_size, seq=image_seq_len(model.config),
                    hidden=tc.hidden_size, max_tiles=pre.max_tiles(), grid=pre.max_grid())

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        s = self._sizes(model, model_dir)
        f = "float32"
        tiles = Dim("num_tiles", 1, min(s["max_tiles"], s["grid"] + 1), s["max_tiles"])
        tc = model.config.text_config
        cache = text_cache(tc, recipe.limits)
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(TensorSpec("pixel_values", f, ("num_tiles", 3, s["tile"], s["tile"]), "one image's tiles, global view last"),),
                outputs=(TensorSpec("vision_hidden", f, ("num_tiles", s["patches"], s["dim"])),),
                dims={"num_tiles": tiles},
                doc="patch conv + position embeddings + ViT over a batch of full tiles, one image per call",
            ),
            ComponentSpec(
                "projector",
                inputs=(TensorSpec("vision_hidden", f, ("num_tiles", s["patches"], s["dim"])),),
                outputs=(TensorSpec("image_embeds", f, ("num_tiles", s["seq"], s["hidden"])),),
                dims={"num_tiles": tiles},
                doc="connector: pixel shuffle + Linear",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         doc="Llama decoder over a static KV cache (capacity = context)"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens

        VisionEncoder, Projector = vision_modules()
        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        s = self._sizes(model, model_dir)
        d = specs["vision_encoder"].dims["num_tiles"]
        n = next((k for k in (3, 2, d.max) if d.min <= k <= d.max and k != d.opt), d.max)  # off 0/1 and opt where possible
        g = torch.Generator().manual_seed(1234)
        text = model.model.text_model
        B = min(2, specs["embed_tokens"].dims["batch"].max)
        return [
            ExportComponent(specs["vision_encoder"], VisionEncoder(model.model.vision_model).eval(),
                            {"pixel_values": torch.randn(n, 3, s["tile"], s["tile"], generator=g)}),
            ExportComponent(specs["projector"], Projector(model.model.connector).eval(),
                            {"vision_hidden": torch.randn(n, s["patches"], s["dim"], generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(text.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, model.config.text_config.vocab_size, (B, 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], text, model.lm_head).eval(), decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        s = self._sizes(model, model_dir)
        tc = model.config.text_config
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "vision": {"tile": s["tile"], "image_seq_len": s["seq"], "scale_factor": int(model.config.scale_factor)},
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "vocab_size": tc.vocab_size},
            "tokens": {"image_token_id": int(model.config.image_token_id)},
        }
