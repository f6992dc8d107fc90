"""Janus / Janus-Pro (Method A), export side: image understanding only.

Components:
  vision_encoder  a batch of fixed-size images [N, 3, S, S] -> the SigLIP-style tower's last hidden states after
                  its post-layernorm [N, (S/p)^2, vision_width] (patch conv, fixed position embedding, encoder).
  projector       the aligner MLP (fc1, GELU, fc2...) -> image_embeds [N * (S/p)^2, hidden].
  embed_tokens    token ids -> embeddings.
  decoder         the generic decoder (families/decoder.py) over the checkpoint's Llama text stack, 1D positions.

The image-generation half of the checkpoint (VQ model, generation embeddings/aligner/head) is not exported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...recipes import Recipe
from ...synthetic import train_bpe_tokenizer
from ..base import FamilyAdapter
from .image import JanusImageParams
from .reference import JanusReference

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
# The DeepSeek tokenizer's special tokens as the Janus checkpoints use them (the image tokens, the chat roles,
# the grounding tokens).
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE_TOKEN, "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
                  "<|grounding|>", "<|User|>", "<|Assistant|>", BOI_TOKEN, EOI_TOKEN]

# The chat template transformers' Janus conversion gives the deepseek-community/Janus(-Pro) checkpoints,
# verbatim (the checkpoints' chat_template.jinja).
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "data" / "janus_chat_template.jinja"


def processor_config(model_dir: Path) -> dict[str, Any]:
    """processor_config.json of a checkpoint ({} when absent): num_image_tokens, use_default_system_prompt and,
    as transformers 5.x saves it, the image processor's settings under "image_processor"."""
    p = Path(model_dir) / "processor_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def image_params(model_dir: Path) -> JanusImageParams:
    """The image processor's settings: preprocessor_config.json, else processor_config.json's "image_processor"."""
    p = Path(model_dir) / "preprocessor_config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
    else:
        cfg = processor_config(model_dir).get("image_processor")
        if not isinstance(cfg, dict):
            raise UserError(f"{model_dir}: no preprocessor_config.json and no image_processor in processor_config.json "
                            "(needed for image preprocessing)")
    return JanusImageParams.from_preprocessor_config(cfg)


class JanusAdapterBase(JanusReference, FamilyAdapter):
    """The Janus-only parts of the adapter: the synthetic checkpoint and the runtime's configuration."""

    model_class = "JanusForConditionalGeneration"

    def default_limits(self, config: dict[str, Any]) -> dict[str, int]:
        return {"max_images": 2}  # 576 tokens per image at 384x384: two images already take 1,154 prompt tokens

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def synthetic_parts(cls, syn: dict[str, Any]):
        """A fresh checkpoint from a `[source.synthetic]` table: (model, processor, generation config). The
        processor (JanusProcessor: the in-repo BPE tokenizer with Janus's special tokens, adding a BOS as the
        DeepSeek tokenizer does; JanusImageProcessorPil at the vision tower's image size; the checkpoints' chat
        template; use_default_system_prompt as released) saves tokenizer, chat template and processor_config.json.
        Weight matrices are redrawn from N(0, init_std) (default 0.08: well separated logits)."""
        import torch
        from tokenizers import processors
        from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusProcessor, PreTrainedTokenizerFast
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        tok = train_bpe_tokenizer(list(SPECIAL_TOKENS), int(syn.get("tokenizer_vocab_size", 1024)))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])])
        text = dict(syn["text_config"])
        vocab = max(int(text.pop("vocab_size", 0)), -(-tok.get_vocab_size() // 64) * 64)
        tie = bool(text.pop("tie_word_embeddings", True))
        text.update(model_type="llama", vocab_size=vocab, bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
                    tie_word_embeddings=tie)
        vision = dict(syn["vision_config"])
        vision["num_image_tokens"] = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        vq = dict(syn.get("vq_config") or dict(embed_dim=4, num_embeddings=32, latent_channels=32, base_channels=32,
                                               channel_multiplier=[1, 1], num_res_blocks=1))
        vq.update(projection_dim=text["hidden_size"], image_token_embed_dim=text["hidden_size"])
        config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids[IMAGE_TOKEN], tie_word_embeddings=tie)
        seed = int(syn.get("seed", 0))
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
        init_std = float(syn.get("init_std", 0.08))
        if init_std:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(seed)
                for _, p in model.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        generation = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False,
                                      guidance_scale=5, boi_token_id=ids[BOI_TOKEN])  # as the released checkpoints' (image generation: CFG)
        model.generation_config = generation
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                            extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN})
        side = int(vision["image_size"])
        processor = JanusProcessor(
            image_processor=JanusImageProcessorPil(size={"height": side, "width": side}, **dict(syn.get("preprocessor", {}))),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE_FILE.read_text(encoding="utf-8"),
            use_default_system_prompt=bool(syn.get("use_default_system_prompt", True)),
            num_image_tokens=vision["num_image_tokens"],
        )
        return model, processor, generation

    # -- runtime configuration -----------------------------------------------------------------
    def prompt_config(self, model, model_dir: Path) -> dict[str, Any]:
        """What JanusProcessor does to a prompt, read from the checkpoint: placeholder tokens and their count, the
        system prompt it prepends (its DEFAULT_SYSTEM_PROMPT when use_default_system_prompt)."""
        from transformers import AutoTokenizer
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        pc = processor_config(model_dir)
        vc = model.config.vision_config
        grid = vc.image_size // vc.patch_size
        n = int(pc.get("num_image_tokens", 576))
        if n != grid * grid:
            raise UserError(f"{model_dir}: processor_config.json says {n} image tokens per image, but the vision tower "
                            f"emits {grid * grid} ({vc.image_size}/{vc.patch_size} squared)")
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        names = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}
        tokens: dict[str, Any] = {k: getattr(tok, k, None) or v for k, v in names.items()}
        tokens["image_token_id"] = int(model.config.image_token_id)
        if tok.convert_tokens_to_ids(tokens["image_token"]) != tokens["image_token_id"]:
            raise UserError(f"{model_dir}: the tokenizer's {tokens['image_token']} is not config.json's image_token_id {tokens['image_token_id']}")
        return {
            "num_image_tokens": n,
            "system_prompt": DEFAULT_SYSTEM_PROMPT if pc.get("use_default_system_prompt", False) else "",
            "tokens": tokens,
        }
