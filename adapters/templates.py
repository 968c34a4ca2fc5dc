"""Chat templates rendered by the proxy itself (for raw-completions remotes
and for remotes that cannot continue a partial assistant message on their
chat endpoint).

Templates are Jinja2, as in Hugging Face's ``chat_template`` convention
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``),
rendered in a sandbox and deterministically: no dates, no tools.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Gemma's turn format (used by Gemma base and instruction-tuned models).
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: ChatML (SmolLM2, Qwen and others), without a default system prompt.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN = {"gemma": GEMMA, "chatml": CHATML}


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja2 chat template with the special tokens it refers to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` to prompt text.

        Raises:
            ValueError: the template failed on these messages (e.g. a role it rejects).
        """
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.source).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed: {exc}") from exc


_MARK = re.compile("\ue000(\\d+)\ue001")


class SpecialStrings:
    """The texts of a tokenizer's special tokens (those it reads as one control token when
    asked to), to find them in message content."""

    def __init__(self, strings: Iterable[str]) -> None:
        self.strings = frozenset(s for s in strings if s)
        self._lengths = sorted({len(s) for s in self.strings})
        self._firsts = {s[0] for s in self.strings}

    def found_in(self, text: str) -> bool:
        """Whether ``text`` holds one of the strings (a scan from each of their first characters)."""
        for c in self._firsts:
            i = text.find(c)
            while i != -1:
                if any(text[i : i + n] in self.strings for n in self._lengths):
                    return True
                i = text.find(c, i + 1)
        return False


def tokenize_chat(
    render: Callable[[Sequence[dict[str, Any]]], str],
    messages: Sequence[dict[str, Any]],
    specials: SpecialStrings,
    special: Callable[[str, bool], list[int]],
    plain: Callable[[str, bool], list[int]],
) -> list[int]:
    """Token ids of the chat prompt ``render(messages)``, where only the template's own text
    may hold special tokens: a message's content is plain text, as OpenAI's API reads it,
    so that ``"<|im_end|><|im_start|>system"`` in a user message is those characters, not a
    forged system turn.

    ``special(text, first)`` tokenizes template text with special tokens recognised,
    ``plain(text, first)`` content with none (``first``: the prompt's first piece, where a
    BOS goes). When no content holds one of ``specials``, the whole rendered text is
    tokenized at once, as before. Otherwise the template's text and the contents are
    tokenized apart: the template is rendered again with a private-use mark for each
    content, and the marks are replaced by the contents (or the contents trimmed, for
    templates that trim them), which must give the rendered text back.

    Raises:
        ValueError: the template failed, or it changes such a content other than by
            trimming it (the content cannot be told apart from the template's text).
    """
    text = render(messages)
    contents = [str(m.get("content") or "") for m in messages]
    if not any(specials.found_in(c) for c in contents):
        return special(text, True)
    skeleton = render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
    parts = _MARK.split(skeleton)  # template text, a mark's index, template text, ...
    for trim in (False, True):
        pieces = [
            (parts[j], False)
            if j % 2 == 0
            else (contents[int(parts[j])].strip() if trim else contents[int(parts[j])], True)
            for j in range(len(parts))
        ]
        if "".join(p for p, _ in pieces) == text:
            break
    else:
        raise ValueError(
            "the chat template changes message content that holds special tokens, so it cannot be read as plain text"
        )
    ids: list[int] = []
    first = True
    for p, is_content in pieces:
        if p:
            ids.extend(plain(p, first) if is_content else special(p, first))
            first = False
    return ids


def hf_special_strings(tokenizer: Any) -> SpecialStrings:
    """A Hugging Face tokenizer's special added tokens (what ``split_special_tokens`` splits)."""
    return SpecialStrings(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)


def hf_chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], specials: SpecialStrings) -> list[int]:
    """The chat prompt's ids under a Hugging Face tokenizer's chat template, the generation
    prompt added, message content read as plain text (:func:`tokenize_chat`).

    Raises:
        ValueError: the template failed, or it changes content that holds special tokens.
    """

    def render(msgs: Sequence[dict[str, Any]]) -> str:
        try:
            return str(tokenizer.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # jinja2 errors from the template itself
            raise ValueError(f"chat template failed: {exc}") from exc

    return tokenize_chat(
        render,
        messages,
        specials,
        lambda text, first: list(tokenizer.encode(text, add_special_tokens=False)),
        lambda text, first: list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)),
    )
