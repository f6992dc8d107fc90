"""mmexport.runtime.prompt.PromptBuilder against transformers' tokenizer (the real thing, no mocks).

render  == tokenizer.apply_chat_template(..., tokenize=False) for the synthetic Qwen2-VL checkpoint's own
           template and for a few real-world template styles (Llama-3, Mistral tool use, `{% generation %}`
           blocks, Qwen3-style reasoning), with the same special tokens both ways
encode  == tokenizer(text)["input_ids"] on placeholder-expanded prompts
decode  == tokenizer.decode(ids, skip_special_tokens=...)
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")  # the synthetic checkpoint is written with torch

from mmexport.errors import UserError  # noqa: E402
from mmexport.families import get_adapter  # noqa: E402
from mmexport.checkpoints import resolve_source  # noqa: E402
from mmexport.recipes import load_recipe  # noqa: E402
from mmexport.runtime.prompt import PromptBuilder, user_message  # noqa: E402

IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMEXPORT_CACHE", str(tmp_path_factory.mktemp("mmexport-cache")))
        r = load_recipe("qwen2-vl-tiny")
        d, _ = resolve_source(r, None, get_adapter(r.family), log=lambda *_: None)
    return Path(d)


@pytest.fixture(scope="session")
def hf_tok(ckpt):
    return transformers.AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="session")
def hf_tok_bos(ckpt):
    """The same tokenizer with a bos_token, for templates that print one."""
    return transformers.AutoTokenizer.from_pretrained(str(ckpt), bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def builder(ckpt, hf_tok) -> PromptBuilder:
    template = (ckpt / "chat_template.jinja").read_text()
    return PromptBuilder(template, ckpt / "tokenizer.json", dict(hf_tok.special_tokens_map))


def test_export_records_the_special_tokens_the_template_sees(ckpt, hf_tok):
    """What an export stores as tokenizer.special_tokens (and the pipeline hands PromptBuilder) is what
    apply_chat_template gives the template."""
    from mmexport.export.build import _special_tokens

    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    ref = {k: v for k, v in hf_tok.special_tokens_map.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    assert _special_tokens(tcfg) == ref


def _hf_render(tok, messages, add_generation_prompt=True, template=None):
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _images(n):
    return [{"type": "image"} for _ in range(n)]


CONVERSATIONS = {
    "text only": [{"role": "user", "content": [{"type": "text", "text": "Describe the weather."}]}],
    "one image": [{"role": "user", "content": _images(1) + [{"type": "text", "text": "What is in this picture?"}]}],
    "three images": [{"role": "user", "content": _images(3) + [{"type": "text", "text": "Compare these three."}]}],
    "images between text": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                {"type": "image"},
                {"type": "text", "text": " then second:"},
                {"type": "image", "image": "file:///tmp/x.png"},
                {"type": "text", "text": " and a url one:"},
                {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
            ],
        }
    ],
    "system + user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": _images(1) + [{"type": "text", "text": "Caption it."}]},
    ],
    "string content": [{"role": "user", "content": "Just a plain string, no list."}],
    "multi-turn": [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": _images(1) + [{"type": "text", "text": "What's this?"}]},
        {"role": "assistant", "content": "A cat on a mat."},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Orange."}]},
        {"role": "user", "content": _images(2) + [{"type": "text", "text": "Now these two."}]},
    ],
    "unicode": [
        {"role": "user", "content": _images(1) + [{"type": "text", "text": "Què és això? 这是什么？ Это кот 🐱 — naïve café\ttab\nnewline  "}]}
    ],
    "empty text": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_matches_apply_chat_template(builder, hf_tok, name, add_generation_prompt):
    msgs = CONVERSATIONS[name]
    ref = _hf_render(hf_tok, msgs, add_generation_prompt)
    assert builder.render(msgs, add_generation_prompt=add_generation_prompt) == ref


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_pipeline_user_message_matches(builder, hf_tok, n_images):
    """The message the pipeline builds for `run PROMPT --image ...`."""
    msgs = user_message("Describe everything you see.", n_images)
    ref = _hf_render(hf_tok, msgs)
    ours = builder.render(msgs)
    assert ours == ref
    assert ours.count(IMAGE_PAD) == n_images


def test_render_does_not_touch_messages(builder):
    msgs = [{"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "because"}, {"role": "user", "content": "y"}]
    snapshot = json.dumps(msgs)
    builder.render(msgs)
    assert json.dumps(msgs) == snapshot


# ---------------------------------------------------------------- other templates, as strings

LLAMA3 = r"""{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}
        {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
            {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
        {%- endif %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] | trim }}
        {%- else %}
            {%- for part in message['content'] %}
                {%- if part['type'] == 'image' %}{{- '<|image|>' }}{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- endif %}
{%- endfor %}
"""

# Mistral-7B-Instruct-v0.3 style: `tools is not none` with no `is defined` guard.
MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}
                {%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] | trim + eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GENERATION = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
        {{- message['content'] + eos_token + '\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 style: namespace, reversed loops, reasoning_content, string methods.
QWEN3 = r"""{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == "user" and message.content is string and not message.content.startswith('<tool_response>') %}
        {%- set ns.last_query_index = index %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

# Zephyr style: no whitespace control at all, so the output depends on trim_blocks + lstrip_blocks.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

TEMPLATE_CASES = [
    ("zephyr", ZEPHYR, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]),
    ("llama3", LLAMA3, [{"role": "user", "content": "Hello there!  "}]),
    (
        "llama3",
        LLAMA3,
        [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What's this?"}]},
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": "Sure? ünïcödé ✓"},
        ],
    ),
    (
        "llama3 tool call",
        LLAMA3,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}}],
            },
            {"role": "tool", "content": {"temp": 21, "sky": "clair"}},
            {"role": "assistant", "content": "21 °C and clear."},
            {"role": "user", "content": "Thanks"},
        ],
    ),
    (
        # OpenAI-style messages carry `tool_calls: None`; apply_chat_template drops None-valued keys
        "llama3 None-valued keys",
        LLAMA3,
        [
            {"role": "user", "content": "Hi", "name": None},
            {"role": "assistant", "content": "Hello!", "tool_calls": None},
            {"role": "user", "content": "Bye"},
        ],
    ),
    ("mistral", MISTRAL, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello "}, {"role": "user", "content": "Bye"}]),
    ("mistral system", MISTRAL, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]),
    ("generation", GENERATION, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]),
    ("generation", GENERATION, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
    (
        "qwen3 reasoning",
        QWEN3,
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "\n4", "reasoning_content": "\nadd them\n"},
        ],
    ),
    (
        # clients send the reasoning as `reasoning` or `thinking`; transformers aliases it to reasoning_content
        "qwen3 reasoning alias",
        QWEN3,
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning": "add them"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "thinking": "add again"},
        ],
    ),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,template,msgs", TEMPLATE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TEMPLATE_CASES)])
def test_other_templates_match(ckpt, hf_tok_bos, name, template, msgs, add_generation_prompt):
    special = dict(hf_tok_bos.special_tokens_map)
    assert special["bos_token"] == "<|endoftext|>" and special["eos_token"] == "<|im_end|>"
    ref = _hf_render(hf_tok_bos, msgs, add_generation_prompt, template=template)
    ours = PromptBuilder(template, ckpt / "tokenizer.json", special).render(msgs, add_generation_prompt=add_generation_prompt)
    assert ours == ref


@pytest.mark.parametrize(
    "template,msgs",
    [
        (LLAMA3, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),  # roles don't alternate
        (MISTRAL, [{"role": "tool", "content": "x"}]),
    ],
)
def test_template_raise_exception(ckpt, hf_tok_bos, template, msgs):
    """The template's own raise_exception: transformers raises TemplateError; we raise a UserError with its text."""
    import jinja2

    with pytest.raises(jinja2.TemplateError) as ref:
        _hf_render(hf_tok_bos, msgs, template=template)
    with pytest.raises(UserError) as ours:
        PromptBuilder(template, ckpt / "tokenizer.json", dict(hf_tok_bos.special_tokens_map)).render(msgs)
    assert str(ref.value) in str(ours.value)


def test_no_template_is_a_user_error(ckpt):
    with pytest.raises(UserError):
        PromptBuilder(None, ckpt / "tokenizer.json", {}).render(user_message("hi", 0))


# ---------------------------------------------------------------- placeholders and tokenization


@pytest.mark.parametrize(
    "name,counts",
    [("text only", []), ("one image", [6]), ("three images", [6, 8, 1]), ("images between text", [1, 64, 3]), ("unicode", [12])],
)
def test_expand_and_encode_match_tokenizer(builder, hf_tok, name, counts):
    text = builder.render(CONVERSATIONS[name])
    expanded = PromptBuilder.replace_placeholders(text, IMAGE_PAD, [IMAGE_PAD * n for n in counts])
    assert expanded.count(IMAGE_PAD) == sum(counts)
    ids = builder.encode(expanded)
    ref = hf_tok(expanded)["input_ids"]
    assert ids == ref
    pad_id = hf_tok.convert_tokens_to_ids(IMAGE_PAD)
    assert ids.count(pad_id) == sum(counts)
    # the i-th placeholder run has counts[i] tokens, in order
    runs = [len(list(g)) for k, g in itertools.groupby(ids) if k == pad_id]
    assert runs == counts


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n\nmany",
        "Què és això? 这是什么？ Это кот 🐱 naïve café",
        "e\u0301 (combining accent, NFC-normalized)",
        "numbers 1234567890 and 3.14159",
        "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
        "",
    ],
)
def test_encode_decode_match_tokenizer(builder, hf_tok, text):
    ids = builder.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert builder.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert builder.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_decode_generated_ids_matches(builder, hf_tok):
    """Arbitrary id sequences (as a model may generate), special ids included."""
    import random

    rnd = random.Random(0)
    vocab = len(hf_tok)
    for _ in range(20):
        ids = [rnd.randrange(vocab) for _ in range(rnd.randrange(1, 40))]
        assert builder.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "text,counts",
    [
        ("<|image_pad|> and <|image_pad|>", [4]),
        ("<|image_pad|>", [4, 4]),
        ("no placeholder", [1]),
        ("<|image_pad|>", []),
    ],
)
def test_placeholder_count_mismatch_raises(text, counts):
    with pytest.raises(UserError):
        PromptBuilder.replace_placeholders(text, IMAGE_PAD, [IMAGE_PAD * n for n in counts])


def _metaspace_builder(tmp_path) -> PromptBuilder:
    """A SentencePiece-style tokenizer (metaspace: a decode drops the first piece's leading space) built with
    the tokenizers library, with byte fallback for text outside its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "Zürich café naïve " * 10], trainer)
    path = tmp_path / "sp.json"
    tok.save(str(path))
    return PromptBuilder(None, path, {})


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_detokenization_equals_one_decode(builder, kind, tmp_path):
    """The stream decodes a short window per token, yet what it emits, token by token, is exactly the decode of the
    whole answer: multi-byte characters split across tokens, special tokens, words, for a byte-level BPE and a
    SentencePiece-style tokenizer (whose decode drops a leading space)."""
    import numpy as np

    from mmexport.runtime.pipeline import TextStream

    pb = builder if kind == "byte-level" else _metaspace_builder(tmp_path)
    texts = ["Hello, world! The café in Zürich — naïve? 東京タワー 🚀🚀 ok.", " the lazy dog, the quick fox ", "a\nb\n\n  c  "]
    specials = [i for i in range(pb.tokenizer.get_vocab_size()) if pb.tokenizer.id_to_token(i) in ("<|im_end|>", "</s>")]
    rng = np.random.default_rng(0)
    for text in texts:
        ids = pb.encode(text)
        for extra in ([], specials):  # an answer with a special token in the middle (skipped by decode)
            seq = ids[: len(ids) // 2] + extra + ids[len(ids) // 2:]
            got: list[str] = []
            stream = TextStream(pb, [], got.append)
            for n in range(1, len(seq) + 1):
                assert not stream.push(seq[:n])
            stream.finish(seq)
            assert "".join(got) == stream.text == pb.decode(seq), (kind, text)
    # random ids, many of them partial UTF-8 bytes: the same, trailing incomplete character included
    for _ in range(5):
        seq = [int(i) for i in rng.integers(0, pb.tokenizer.get_vocab_size(), 40)]
        got = []
        stream = TextStream(pb, [], got.append)
        for n in range(1, len(seq) + 1):
            stream.push(seq[:n])
        stream.finish(seq)
        assert "".join(got) == pb.decode(seq)


def test_stop_strings_cut_the_stream(builder):
    from mmexport.runtime.pipeline import TextStream

    ids = builder.encode("one two three four five")
    got: list[str] = []
    stream = TextStream(builder, ["thr", "xyz"], got.append)
    hit = next(n for n in range(1, len(ids) + 1) if stream.push(ids[:n]))
    stream.finish(ids[:hit])
    assert stream.text == "one two " and "".join(got) == "one two "
