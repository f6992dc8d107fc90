"""Prompts: the checkpoint's own chat template rendered as transformers' apply_chat_template renders it
(sandboxed jinja2, trim_blocks + lstrip_blocks, the same globals and `tojson`), image placeholders
expanded to one token per image embedding, and tokenization with the checkpoint's tokenizer.json.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# The names a message's reasoning goes by; templates read the first (transformers fills all of them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def user_message(prompt: str, num_images: int) -> list[dict[str, Any]]:
    """One user turn: the images first, then the text (as in the model cards' examples)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class PromptBuilder:
    def __init__(self, chat_template: str | None, tokenizer_file: Path, special_tokens: dict[str, str]):
        from tokenizers import Tokenizer

        self.chat_template = chat_template
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.special_tokens = special_tokens  # bos_token, eos_token, ... as the template sees them

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        if not self.chat_template:
            raise UserError("this checkpoint has no chat template; use --raw-prompt")
        try:
            template = _compile(self.chat_template)
            # What apply_chat_template hands the template: `tools` and `documents` defined (None), message keys
            # whose value is None dropped, reasoning under its aliases, then the special tokens.
            return template.render(
                messages=_template_messages(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed: {e}") from None

    @staticmethod
    def replace_placeholders(text: str, placeholder: str, replacements: Sequence[str]) -> str:
        """Replace the i-th `placeholder` with replacements[i]."""
        parts = text.split(placeholder)
        if len(parts) - 1 != len(replacements):
            raise UserError(f"the prompt holds {len(parts) - 1} image placeholders for {len(replacements)} images")
        out = [parts[0]]
        for r, rest in zip(replacements, parts[1:]):
            out.append(r)
            out.append(rest)
        return "".join(out)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
