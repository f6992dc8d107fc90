#!/usr/bin/env python
"""Train a tiny Qwen2-VL (transformers' Qwen2VLForConditionalGeneration, the real architecture) on the
synthetic `shapes` task (mmexport/tasks/shapes.py) so that the demo answers what it sees.

    python scripts/train_shapes.py                  # train, evaluate, write checkpoints/qwen2-vl-shapes/
    python scripts/train_shapes.py --eval-only      # load the committed checkpoint, report accuracy

The checkpoint is built the way mmexport's synthetic Qwen2-VL checkpoints are (the same in-repo BPE
tokenizer with Qwen2-VL's special tokens, the Qwen2-VL chat template, Qwen2VLImageProcessorPil, a
generation config stopping at <|im_end|> / <|endoftext|>), so mmexport's runtime handles it as it
handles any local Qwen2-VL directory. Training sees exactly the inference format: the chat template
with its default system prompt, one user turn [image, question], the generation prompt, then the
answer and <|im_end|>; the loss covers only the answer tokens and that <|im_end|>.

Training, all on CPU, deterministic for a given --seed and thread count:
  stage 1a  the vision tower alone learns the kind of single shapes (max-pooled merged tokens, a
            throwaway linear head; --kind-steps);
  stage 1b  the vision tower learns per-token labels (kind, colour, left/right/only of the shape under
            each merged token, or background; `TokenTargets`, a throwaway head; --vision-steps);
  stage 2   the whole model on the answers (cross-entropy on the answer tokens and <|im_end|>), the
            token head's loss kept at --token-loss-weight. Each step takes --images-per-step images
            from `shapes.stream(TRAIN_SEED)` and asks about each its own question plus up to
            --questions-per-image - 1 others (`shapes.all_questions`), each image through the vision
            tower once. Images identical to a held-out image are skipped (none occurs; logged).
The throwaway heads are not saved: the checkpoint is a plain Qwen2VLForConditionalGeneration.

Measured on the 2-core CI machine (defaults, 2 threads): see README ("The trained tiny model").
What it does not learn in these minutes: finding a shape by its name among two (the "position" kind,
and the colour of a named shape among two) stays at chance after 1000 steps of stage 2 (and after 400
more steps on those questions alone, vision frozen), although the
tokens carry the left/right role (99 % per token after stage 1b); the task (`shapes.KINDS`) leaves it out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from mmexport.tasks import shapes  # noqa: E402

DEFAULT_OUT = REPO / "checkpoints" / "qwen2-vl-shapes"

# The architecture: Qwen2-VL's ViT (2D rotary, 14 px patches, 2-frame temporal patches, 2x2 PatchMerger)
# and Qwen2 decoder with M-RoPE, at a few MB.
VISION_CONFIG = dict(
    depth=4,
    embed_dim=96,
    num_heads=4,
    mlp_ratio=2,
    hidden_size=128,  # = the LLM width; the merger maps 4*96 -> 128
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    hidden_act="quick_gelu",
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},  # head_dim 32
)
TOKENIZER_VOCAB = 1024  # as qwen2-vl-tiny: the BPE learns what the in-repo corpus holds (871) + specials
# Every image is resized to 112^2..140^2 px (multiples of 28): 16 to 25 image tokens, shapes >= ~16 px in radius.
PREPROCESSOR = dict(min_pixels=112 * 112, max_pixels=140 * 140)
MAX_NEW_TOKENS = 16


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# checkpoint pieces
# ------------------------------------------------------------------------------------------------
def build_model_and_processors(seed: int):
    """A freshly initialized model (transformers' own init, eager attention), its tokenizer and image
    processor: mmexport's synthetic Qwen2-VL checkpoint pieces, at this script's sizes."""
    from mmexport.families.qwen2_vl.export import Qwen2VLAdapter

    syn = dict(seed=seed, tokenizer_vocab_size=TOKENIZER_VOCAB, init_std=0, text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, preprocessor=PREPROCESSOR)
    model, tokenizer, image_processor, _ = Qwen2VLAdapter.synthetic_parts(syn, attn_implementation="eager")
    return model, tokenizer, image_processor


def load_checkpoint(model_dir: Path):
    """model (eval mode, fp32, eager attention), tokenizer, image processor from a checkpoint directory."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    return model.eval(), tokenizer, image_processor


def save_checkpoint(model, tokenizer, image_processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # a clean directory: no stale files from an earlier layout
        if p.is_file():
            p.unlink()
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------------
# inputs: exactly what Qwen2VLProcessor builds (chat template, image pads expanded, mm_token_type_ids)
# ------------------------------------------------------------------------------------------------
class Encoder:
    def __init__(self, model, tokenizer, image_processor):
        self.tok = tokenizer
        self.ip = image_processor
        self.image_token_id = model.config.image_token_id
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id
        self.merge = image_processor.merge_size**2
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_text(self, question: str, n_image_tokens: int) -> str:
        text = self.tok.apply_chat_template(shapes.user_messages(question), tokenize=False, add_generation_prompt=True)
        assert text.count("<|image_pad|>") == 1
        return text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)

    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        key = (question, n_image_tokens)
        if key not in self._prompts:
            self._prompts[key] = self.tok(self.prompt_text(question, n_image_tokens), add_special_tokens=False)["input_ids"]
        return self._prompts[key]

    def answer_ids(self, question: str, n_image_tokens: int, answer: str) -> list[int]:
        """The answer's tokens + <|im_end|>; checked once to tokenize as the whole conversation does."""
        if answer not in self._answers:
            ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.im_end]
            whole = self.tok(self.prompt_text(question, n_image_tokens) + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            assert whole == self.prompt_ids(question, n_image_tokens) + ids, f"answer {answer!r} tokenizes differently in context"
            self._answers[answer] = ids
        return self._answers[answer]

    def images(self, images):
        import torch

        iv = self.ip(images=images, return_tensors="pt")
        counts = [int(g.prod()) // self.merge for g in iv["image_grid_thw"]]
        return iv["pixel_values"].to(torch.float32), iv["image_grid_thw"], counts

    def inference_inputs(self, image, question: str) -> dict:
        import torch

        pv, grid, counts = self.images([image])
        ids = torch.tensor([self.prompt_ids(question, counts[0])])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32),
            "pixel_values": pv,
            "image_grid_thw": grid,
        }

    def training_batch(self, images, qas) -> dict:
        """Right-padded batch of question/answer sequences over `images` (each image encoded once).

        qas: (image index, question, answer). Labels are -100 everywhere but the answer tokens and the
        closing <|im_end|>.
        """
        import torch

        pv, grid, counts = self.images(images)
        seqs, labs = [], []
        for i, q, a in qas:
            p = self.prompt_ids(q, counts[i])
            ans = self.answer_ids(q, counts[i], a)
            seqs.append(p + ans)
            labs.append([-100] * len(p) + ans)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, lab) in enumerate(zip(seqs, labs)):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, : len(s)] = torch.tensor(lab)
            mask[r, : len(s)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32),
            "pixel_values": pv,
            "image_grid_thw": grid,
            "image_index": torch.tensor([i for i, _, _ in qas]),
            "labels": labels,
        }


def forward(model, batch):
    """Hidden states [B, S, H] of the decoder for a `training_batch`, and the merged image features (one
    tensor per image). The same computation as `model(**inputs)` (vision tower, image features scattered
    into the <|image_pad|> embeddings, M-RoPE positions from get_rope_index, the decoder), except that
    each image goes through the vision tower once however many sequences ask about it."""
    import torch

    m = model.model
    feats = m.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output  # one per image
    ids = batch["input_ids"]
    embeds = m.get_input_embeddings()(ids)
    image_embeds = torch.cat([feats[i] for i in batch["image_index"].tolist()], dim=0)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
    grid = batch["image_grid_thw"][batch["image_index"]]
    pos, _ = m.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=grid, attention_mask=batch["attention_mask"])
    h = m.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=batch["attention_mask"]).last_hidden_state
    return h, feats


def training_loss(model, batch):
    """Mean cross-entropy over the labelled tokens (lm_head only where a label is), and the merged image
    features (for the token head)."""
    import torch

    h, feats = forward(model, batch)
    labels = batch["labels"][:, 1:]
    sel = labels != -100
    logits = model.lm_head(h[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), labels[sel]), feats


def teacher_forced(model, encoder: Encoder, exs, batch_size: int = 50) -> dict:
    """Per-kind accuracy with the answer fed in: right when every answer token (and <|im_end|>) is the
    argmax. That is exactly when greedy decoding would produce the answer, so it matches `evaluate` up
    to float noise, batched and without generate: cheap enough to watch during training."""
    import torch

    right, total = Counter(), Counter()
    with torch.no_grad():
        for k in range(0, len(exs), batch_size):
            chunk = exs[k : k + batch_size]
            b = encoder.training_batch([e.image for e in chunk], [(i, e.question, e.answer) for i, e in enumerate(chunk)])
            pred = model.lm_head(forward(model, b)[0][:, :-1]).argmax(-1)
            lab = b["labels"][:, 1:]
            ok = ((pred == lab) | (lab == -100)).all(dim=1)
            for e, o in zip(chunk, ok.tolist()):
                total[e.kind] += 1
                right[e.kind] += o
    return {
        "n": sum(total.values()),
        "accuracy": sum(right.values()) / max(1, sum(total.values())),
        "per_kind": {k: {"correct": right[k], "n": total[k], "accuracy": right[k] / total[k]} for k in shapes.KINDS if total[k]},
    }


def answer(model, encoder: Encoder, image, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy answer (transformers' generate), special tokens dropped."""
    import torch

    inputs = encoder.inference_inputs(image, question)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return encoder.tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, encoder: Encoder, exs, show: int = 0) -> dict:
    """Exact-answer accuracy over `exs`, overall and per question kind."""
    model.eval()
    right, total, wrong = Counter(), Counter(), []
    for ex in exs:
        pred = answer(model, encoder, ex.image, ex.question)
        ok = shapes.is_correct(pred, ex.answer)
        total[ex.kind] += 1
        right[ex.kind] += ok
        if not ok:
            wrong.append((ex.question, ex.answer, pred))
    res = {
        "n": sum(total.values()),
        "accuracy": sum(right.values()) / max(1, sum(total.values())),
        "per_kind": {k: {"correct": right[k], "n": total[k], "accuracy": right[k] / total[k]} for k in shapes.KINDS if total[k]},
        "wrong": wrong,
    }
    for q, a, p in wrong[:show]:
        log(f"    wrong: {q!r}: expected {a!r}, got {p!r}")
    return res


def report(res: dict, label: str) -> None:
    kinds = "  ".join(f"{k} {v['correct']}/{v['n']}" for k, v in res["per_kind"].items())
    log(f"{label}: {res['accuracy']:.1%} of {res['n']}  ({kinds})")


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
ROLES = ("only", "left", "right")  # a token's shape: the only one, the left one, the right one


class TokenTargets:
    """Dense labels for the vision tower's merged tokens, and the throwaway head that reads them.

    Each merged token covers a (merge * patch)^2 = 28 x 28 px block of the resized image. Its labels are
    the kind, colour and role (only / left / right) of the shape that covers most of that block, or
    "background" (an extra class) when no shape covers more than 2 %; blocks a shape covers only between
    2 % and 12 % are ignored (a sliver says little). The coverage comes from the generator's own
    rasterization (`shapes.coverage`), resized to the processor's resized image size.

    Why: through the language model alone the ViT gets almost no gradient at first (the decoder's
    attention starts as a near-uniform average, and a shape's kind cannot be read from an average of
    random patch features); measured, 1000+ steps without shape learning. Per-token labels give every
    token its own signal, and they ask for exactly what the decoder will need to look up: the named
    shape's tokens say what it is, its colour and on which side it is. The head is discarded; the
    checkpoint is the plain Qwen2-VL.
    """

    def __init__(self, hidden: int, merge: int, patch: int):
        import torch

        self.merge, self.patch = merge, patch
        self.sizes = (len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1, len(ROLES) + 1)
        self.head = torch.nn.Linear(hidden, sum(self.sizes))

    def labels(self, ex, grid_h: int, grid_w: int) -> np.ndarray:
        """[tokens, 3] int64: kind, colour, role per merged token (row-major), -100 where ignored."""
        from PIL import Image

        m, p = self.merge, self.patch
        cov = []
        for c in shapes.coverage(ex):
            r = np.asarray(Image.fromarray(c, mode="F").resize((grid_w * p, grid_h * p), Image.Resampling.BILINEAR))
            cov.append(r.reshape(grid_h // m, m * p, grid_w // m, m * p).mean(axis=(1, 3)).reshape(-1))
        cov = np.stack(cov)  # [shapes, tokens]
        best, val = cov.argmax(0), cov.max(0)
        n_k, n_c, n_r = (k - 1 for k in self.sizes)  # background class = last
        colours = list(shapes.COLOURS)
        role = [0] if len(ex.shapes) == 1 else [1, 2]
        out = np.full((cov.shape[1], 3), -100, dtype=np.int64)
        for t in range(cov.shape[1]):
            if val[t] <= 0.02:
                out[t] = (n_k, n_c, n_r)
            elif val[t] >= 0.12:
                s = ex.shapes[best[t]]
                out[t] = (shapes.SHAPES.index(s.kind), colours.index(s.colour), role[best[t]])
        return out

    def batch_labels(self, exs, grid):
        import torch

        return torch.from_numpy(np.concatenate([self.labels(e, int(g[1]), int(g[2])) for e, g in zip(exs, grid)]))

    def loss(self, feats, labels):
        """Sum of the three cross-entropies over the merged tokens; and per-attribute accuracy on object tokens."""
        import torch

        f = torch.nn.functional.cross_entropy
        outs = torch.split(self.head(feats), self.sizes, dim=-1)
        obj = (labels[:, 0] >= 0) & (labels[:, 0] < self.sizes[0] - 1)  # tokens on a shape
        bg = labels[:, 0] == self.sizes[0] - 1
        # object and background tokens weigh the same (most tokens are background)
        loss = sum(f(o[obj], labels[obj, i]) + f(o[bg], labels[bg, i]) for i, o in enumerate(outs))
        acc = [((o.argmax(-1) == labels[:, i]) & obj).sum().item() / max(1, int(obj.sum())) for i, o in enumerate(outs)]
        return loss, acc


def pretrain_vision(model, enc: Encoder, targets: TokenTargets, single, data, args) -> None:
    """Stage 1: the vision tower (ViT + PatchMerger) alone, the decoder untouched.

    1a. --kind-steps on single-shape images (`single`): the shape's kind from the max-pooled merged
        tokens through a throwaway linear head. Measured: the kind is learned this way (~95 % in 400
        steps) but not from the per-token labels alone (chance after 1000 steps): the max-pool lets the
        ViT find the one most telling patch first.
    1b. --vision-steps on all images (`data`): the per-token labels of `targets` (kind, colour, role).
    """
    import torch

    visual = model.model.visual
    f = torch.nn.functional.cross_entropy
    kind_head = torch.nn.Linear(model.config.text_config.hidden_size, len(shapes.SHAPES))
    params = list(visual.parameters()) + list(kind_head.parameters()) + list(targets.head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.0)
    monitor = shapes.examples(shapes.EVAL_SEED, 64)
    pv_m, grid_m, _ = enc.images([e.image for e in monitor])
    y_m = targets.batch_labels(monitor, grid_m)
    visual.train()
    t = time.time()
    for step in range(args.kind_steps):
        exs = [next(single) for _ in range(args.vision_batch)]
        pv, grid, counts = enc.images([e.image for e in exs])
        parts = torch.split(visual(pv, grid_thw=grid).pooler_output, counts)
        logits = kind_head(torch.stack([p.max(0).values for p in parts]))
        y = torch.tensor([shapes.SHAPES.index(e.shapes[0].kind) for e in exs])
        loss = f(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.kind_steps:
            acc = (logits.argmax(1) == y).float().mean().item()
            log(f"vision 1a step {step + 1:5d}  loss {loss.item():.4f}  batch kind accuracy {acc:.0%}  {time.time() - t:5.0f}s")
    for step in range(args.vision_steps):
        exs = [next(data) for _ in range(args.vision_batch)]
        pv, grid, _ = enc.images([e.image for e in exs])
        loss, _ = targets.loss(visual(pv, grid_thw=grid).pooler_output, targets.batch_labels(exs, grid))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_steps:
            with torch.no_grad():
                _, acc = targets.loss(visual(pv_m, grid_thw=grid_m).pooler_output, y_m)
            log(f"vision 1b step {step + 1:5d}  loss {loss.item():.4f}  held-out shape tokens: kind {acc[0]:.0%} colour {acc[1]:.0%} role {acc[2]:.0%}  {time.time() - t:5.0f}s")


def train(args) -> None:
    import torch

    t0 = time.time()
    model, tokenizer, image_processor = build_model_and_processors(args.seed)
    enc = Encoder(model, tokenizer, image_processor)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {n_params / 1e6:.2f}M parameters; {args.steps} steps x {args.images_per_step} images x <= {args.questions_per_image} "
        f"questions, lr {args.lr}, {torch.get_num_threads()} threads"
    )

    held_out = shapes.examples(shapes.EVAL_SEED, max(args.eval_n, shapes.EVAL_EXAMPLES))
    held_out_images = {shapes.image_digest(ex.image) for ex in held_out}
    skipped = 0

    def training_examples(seed=shapes.TRAIN_SEED, kinds=shapes.KINDS):
        """shapes.stream(seed), less any example whose image is a held-out image (none is)."""
        nonlocal skipped
        for ex in shapes.stream(seed, kinds=kinds):
            if shapes.image_digest(ex.image) in held_out_images:
                skipped += 1
                continue
            yield ex

    data = training_examples()
    vcfg = model.config.vision_config
    torch.manual_seed(args.seed + 1)
    targets = TokenTargets(model.config.text_config.hidden_size, vcfg.spatial_merge_size, vcfg.patch_size)
    if args.vision_cache and args.vision_cache.exists():  # development: reuse a stage 1 result
        state = torch.load(args.vision_cache)
        model.model.visual.load_state_dict(state["visual"])
        targets.head.load_state_dict(state["head"])
        log(f"stage 1 loaded from {args.vision_cache}")
    elif args.kind_steps or args.vision_steps:
        single = training_examples([shapes.TRAIN_SEED, 1], ("shape",))
        pretrain_vision(model, enc, targets, single, data, args)
        if args.vision_cache:
            torch.save({"visual": model.model.visual.state_dict(), "head": targets.head.state_dict()}, args.vision_cache)

    pick = np.random.default_rng([shapes.TRAIN_SEED, args.seed])  # which extra questions per image

    def next_batch():
        """images_per_step images from the training stream; for each, its own question and up to
        questions_per_image - 1 more about the same image (shapes.all_questions)."""
        images, qas, exs = [], [], []
        while len(images) < args.images_per_step:
            ex = next(data)
            i = len(images)
            images.append(ex.image)
            exs.append(ex)
            qas.append((i, ex.question, ex.answer))
            others = [(q, a) for _, q, a in shapes.all_questions(ex) if q != ex.question]
            k = min(len(others), args.questions_per_image - 1)
            for j in pick.choice(len(others), size=k, replace=False):
                qas.append((i, *others[int(j)]))
        batch = enc.training_batch(images, qas)
        batch["token_labels"] = targets.batch_labels(exs, batch["image_grid_thw"])
        return batch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]  # matrices but embeddings
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay + list(targets.head.parameters()), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, int(0.04 * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t_train, t_data, loss_avg = time.time(), 0.0, None
    for step in range(args.steps):
        td = time.time()
        batch = next_batch()
        t_data += time.time() - td
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        lm_loss, feats = training_loss(model, batch)
        loss = lm_loss
        if args.token_loss_weight:
            loss = loss + args.token_loss_weight * targets.loss(torch.cat(list(feats)), batch["token_labels"])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = lm_loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * lm_loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t_train
            log(f"step {step + 1:5d}  answer loss {loss_avg:.4f}  lr {lr_at(step):.2e}  {el:6.0f}s (data {t_data:.0f}s)")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            report(teacher_forced(model, enc, held_out[: args.eval_every_n]), f"  held-out @ {step + 1} (teacher-forced)")
            model.train()
    train_s = time.time() - t_train
    log(f"trained {args.steps} steps in {train_s:.0f}s ({train_s / 60:.1f} min); held-out duplicates skipped: {skipped}")

    model.eval()
    save_checkpoint(model, tokenizer, image_processor, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    log(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    # evaluate what was written, loaded the way verify loads it
    model, tokenizer, image_processor = load_checkpoint(args.out)
    res = evaluate(model, Encoder(model, tokenizer, image_processor), held_out[: args.eval_n], show=20)
    report(res, "held-out (PyTorch greedy generate)")
    log(f"total wall time {time.time() - t0:.0f}s")
    summary = {k: v for k, v in res.items() if k != "wrong"}
    summary.update(train_seconds=round(train_s, 1), steps=args.steps, images_per_step=args.images_per_step, questions_per_image=args.questions_per_image, threads=torch.get_num_threads(), parameters=n_params)
    log(json.dumps(summary))


def eval_only(args) -> None:
    import torch

    t0 = time.time()
    model, tokenizer, image_processor = load_checkpoint(args.out)
    enc = Encoder(model, tokenizer, image_processor)
    res = evaluate(model, enc, shapes.examples(shapes.EVAL_SEED, args.eval_n), show=20)
    report(res, f"held-out (PyTorch greedy generate, {args.out})")
    log(f"{time.time() - t0:.0f}s, {torch.get_num_threads()} threads")
    if res["accuracy"] < args.min_accuracy:
        sys.exit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: checkpoints/qwen2-vl-shapes)")
    ap.add_argument("--seed", type=int, default=0, help="model initialization seed")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--images-per-step", type=int, default=16)
    ap.add_argument("--questions-per-image", type=int, default=4, help="sequences per image per step (its own question + others)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kind-steps", type=int, default=400, help="stage 1a: vision tower steps on single-shape kinds")
    ap.add_argument("--vision-steps", type=int, default=600, help="stage 1b: vision tower steps with the token head")
    ap.add_argument("--vision-cache", type=Path, default=None, help="development: save stage 1 here, or load it if the file exists")
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--token-loss-weight", type=float, default=0.3, help="stage 2 keeps the token head's loss at this weight")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval-only", action="store_true", help="load --out and report held-out accuracy")
    ap.add_argument("--eval-n", type=int, default=shapes.EVAL_EXAMPLES, help="held-out examples to evaluate")
    ap.add_argument("--min-accuracy", type=float, default=0.95, help="--eval-only exits 1 below this")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate a held-out prefix every N steps (0: only at the end)")
    ap.add_argument("--eval-every-n", type=int, default=200)
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    (eval_only if args.eval_only else train)(args)


if __name__ == "__main__":
    main()
