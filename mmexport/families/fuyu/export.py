"""Fuyu (Method A without an image encoder), export side.

Components:
  vision_encoder  one image's patches [num_patches, 30*30*3] -> image_embeds [num_patches, hidden]: Fuyu's
                  only vision weights, the linear patch embedding `vision_embed_tokens` (there is no projector)
  embed_tokens    token ids -> embeddings
  decoder         the generic decoder (families/decoder.py) over the checkpoint's Persimmon text stack
                  (fused qkv, q/k LayerNorm, partial rotary, relu²), 1D positions
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...spec import ComponentSpec, Dim, TensorSpec
from ..base import ExportComponent, FamilyAdapter, text_cache
from .image import FuyuImageParams
from .reference import FuyuReference

# Fuyu's special tokens (adept/fuyu-8b's tokenizer): BOS, end of text, the image placeholder and row end, and the
# byte tokens the processor writes as text (<0x04>: beginning of answer; <0x00>-<0x03>: box / point tags).
SPECIAL_TOKENS = ["<s>", "|ENDOFTEXT|", "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>"]
IMAGE_TOKENS = ["|SPEAKER|", "|NEWLINE|"]


def fuyu_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the in-repo corpus that tokenizes like fuyu-8b's SentencePiece one
    where FuyuProcessor depends on it: a space is prepended to each text segment (the word-boundary piece that
    FuyuProcessor drops from the image part), |SPEAKER| and |NEWLINE| are ordinary vocabulary pieces (learned
    whole), <s> and the end-of-text / byte tags are special tokens, and <s> is added as BOS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from ...synthetic import CORPUS, QWEN2_SPLIT

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Prepend(" ")])
    image = "|".join(t.replace("|", "\\|") for t in IMAGE_TOKENS)
    split = f"{image}|\\s+(?={image})|{QWEN2_SPLIT}"  # the image tokens whole, a space before one on its own
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = CORPUS.read_text().splitlines() + ["|SPEAKER||SPEAKER||NEWLINE|"] * 64  # so both are learned whole
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    for t in IMAGE_TOKENS:
        if tok.token_to_id(t) is None:
            raise RuntimeError(f"the synthetic Fuyu tokenizer did not learn {t} as one piece")
    return tok

# fuyu-8b ships no chat template: FuyuProcessor lays the prompt out itself (`prepare_inputs_layout`): the image
# placeholder first, then the text, then <0x04> (beginning of answer) when there is an image. This template
# renders a chat's text in that layout (the user turns' texts, in order); the runtime then expands the
# placeholder and tokenizes as the processor does (runtime.py).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0) -%}"
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{{- '|SPEAKER|' * ns.images -}}"
    "{%- for message in messages -%}{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if ns.images -%}<0x04>{%- endif -%}"
)


class FuyuAdapter(FuyuReference, FamilyAdapter):
    model_class = "FuyuForCausalLM"
    default_chat_template = CHAT_TEMPLATE

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def synthetic_parts(cls, syn: dict[str, Any]):
        """(model, tokenizer, image processor, generation config): a seeded FuyuForCausalLM (Persimmon text stack)
        and the in-repo BPE tokenizer with Fuyu's special tokens. Like fuyu-8b's SentencePiece tokenizer, it
        starts every encoding with a word-boundary piece (a prepended space) — the token FuyuProcessor drops
        from the image part — and adds <s> as BOS."""
        import torch
        from transformers import FuyuConfig, FuyuForCausalLM, GenerationConfig, PreTrainedTokenizerFast
        from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

        tok = fuyu_tokenizer(int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in (*IMAGE_TOKENS, *SPECIAL_TOKENS)}
        text = dict(syn["text_config"])
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        text.update(model_type="persimmon", vocab_size=vocab, bos_token_id=ids["<s>"], eos_token_id=ids["|ENDOFTEXT|"], pad_token_id=ids["|ENDOFTEXT|"])
        pre = dict(syn.get("preprocessor", {}))
        patch = pre.get("patch_size", {"height": 30, "width": 30})
        config = FuyuConfig(text_config=text, patch_size=int(patch["height"]), num_channels=3, image_token_id=ids["|SPEAKER|"],
                            tie_word_embeddings=False, pad_token_id=ids["|ENDOFTEXT|"])
        torch.manual_seed(int(syn.get("seed", 0)))
        model = FuyuForCausalLM._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(int(syn.get("seed", 0)))
            for _, p in model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        generation = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["|ENDOFTEXT|"], pad_token_id=ids["|ENDOFTEXT|"], do_sample=False)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="|ENDOFTEXT|", pad_token="|ENDOFTEXT|")
        return model, tokenizer, FuyuImageProcessorPil(**pre), generation

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 1}  # FuyuProcessor takes one image per prompt

    # -- declarations --------------------------------------------------------------------------
    @staticmethod
    def _preprocessor(model_dir: Path) -> FuyuImageParams:
        p = model_dir / "preprocessor_config.json"
        if not p.is_file():
            raise UserError(f"{model_dir}: no preprocessor_config.json (needed for image preprocessing)")
        return FuyuImageParams.from_preprocessor_config(json.loads(p.read_text()))

    def _patches(self, model_dir: Path) -> Dim:
        n = self._preprocessor(model_dir).max_patches
        return Dim("num_patches", 1, min(n, max(2, n // 4)), n)

    def specs(self, model, recipe: Recipe, model_dir: Path) -> list[ComponentSpec]:
        from ..decoder import decoder_spec, embed_spec

        if recipe.limits.max_images > 1:
            raise UserError(f"recipe {recipe.name}: Fuyu takes one image per prompt (FuyuProcessor); set [limits] max_images = 1")
        cfg = model.config
        tc = cfg.text_config
        patch_dim = cfg.num_channels * cfg.patch_size**2
        pre = self._preprocessor(model_dir)
        if pre.patch_dim != patch_dim:
            raise UserError(f"{model_dir}: preprocessor patches of {pre.patch_dim} values, the model's patch embedding takes {patch_dim}")
        cache = text_cache(tc, recipe.limits)
        f = "float32"
        return [
            ComponentSpec(
                "vision_encoder",
                inputs=(TensorSpec("pixel_values", f, ("num_patches", patch_dim), "one image's patches, row-major, each (h, w, channel)"),),
                outputs=(TensorSpec("image_embeds", f, ("num_patches", tc.hidden_size), "one embedding per |SPEAKER| token"),),
                dims={"num_patches": self._patches(model_dir)},
                doc="vision_embed_tokens: Fuyu's linear patch embedding (no image encoder, no projector)",
            ),
            embed_spec(tc.hidden_size, cache),
            decoder_spec(cache, tc.hidden_size, tc.vocab_size, positions="1d",
                         doc="Persimmon decoder (fused qkv, q/k LayerNorm, partial rotary) over a static KV cache"),
        ]

    def components(self, model, recipe: Recipe, model_dir: Path) -> list[ExportComponent]:
        import torch

        from ..decoder import StaticCacheDecoder, decoder_example
        from ..parts import EmbedTokens, ModuleCall

        specs = {c.name: c for c in self.specs(model, recipe, model_dir)}
        g = torch.Generator().manual_seed(1234)
        d = specs["vision_encoder"].dims["num_patches"]
        sizes = [k for k in range(max(2, d.min), d.max + 1) if k != d.opt] or [d.max]
        n = min(sizes, key=lambda k: abs(k - 6))  # off 0/1 and the opt size, close to 6 patches
        lm = model.model.language_model
        vocab = model.config.text_config.vocab_size
        patch_dim = specs["vision_encoder"].inputs[0].shape[1]
        return [
            ExportComponent(specs["vision_encoder"], ModuleCall(model.model.vision_embed_tokens).eval(),
                            {"pixel_values": torch.randn(n, patch_dim, generator=g)}),
            ExportComponent(specs["embed_tokens"], EmbedTokens(lm.embed_tokens).eval(),
                            {"input_ids": torch.randint(0, vocab, (min(2, specs["embed_tokens"].dims["batch"].max), 7), generator=g)}),
            ExportComponent(specs["decoder"], StaticCacheDecoder(specs["decoder"], lm, model.lm_head).eval(), decoder_example(specs["decoder"])),
        ]

    def runtime_config(self, model, model_dir: Path, recipe: Recipe) -> dict[str, Any]:
        cfg = model.config
        tc = cfg.text_config
        return {
            "image": self._preprocessor(model_dir).to_dict(),
            "text": {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers, "vocab_size": tc.vocab_size},
            "tokens": {"image_token": "|SPEAKER|", "newline_token": "|NEWLINE|", "image_token_id": cfg.image_token_id},
        }
