"""Chat templates rendered by the proxy itself (for raw-completions remotes
and for remotes that cannot continue a partial assistant message on their
chat endpoint).

Templates are Jinja2, as in Hugging Face's ``chat_template`` convention
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``),
rendered in a sandbox and deterministically: no dates, no tools.
"""

from __future__ import annotations

from collections.abc import Sequence
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
