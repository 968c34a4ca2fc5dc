"""One :class:`ServerProfile` per kind of OpenAI-compatible server: what the HTTP adapters
need to know about the server behind them.

==============  ==================================================  =============  =======================
profile         continues a partial assistant message (chat)         top-k drafts   scores given text
==============  ==================================================  =============  =======================
``llama.cpp``   a trailing assistant message (``llama-server``)      yes            no
``vllm``        ``continue_final_message: true`` +                   yes            ``prompt_logprobs``
                ``add_generation_prompt: false`` (vLLM, SGLang)
``deepseek``    a trailing assistant message with ``prefix: true``   no             no
``none``        cannot (OpenAI's own chat models; token mode         no             no
                refused)
==============  ==================================================  =============  =======================

The config names a profile by its string (``prefill`` for ``openai-chat``, ``sampling`` for
``openai-completions``); ``proxy.registry`` looks it up once (:func:`server_profile`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from proxy.common.literals import Prefill


def _frozen(**fields: Any) -> Mapping[str, Any]:
    return MappingProxyType(fields)


@dataclass(frozen=True, slots=True)
class ChatPrefill:
    """How a chat endpoint continues a partial assistant message: it is sent as a trailing
    assistant message with ``message``'s fields added, and the request with ``body``'s."""

    message: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    """Fields of the trailing assistant message besides role and content (DeepSeek's ``prefix``)."""
    body: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    """Request fields that make the server continue that message instead of answering it."""


@dataclass(frozen=True, slots=True)
class ServerProfile:
    """What an HTTP adapter needs to know about the server behind it."""

    name: Prefill
    """The config's value that names it."""
    sampling_off: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    """Request fields that switch the server's sampling filters off (top_k / min_p / penalties)
    in draft requests, so that the reported logprobs are the distribution it samples from."""
    top_k_drafts: bool = False
    """Whether its sampled drafts can be drawn from the top-k candidates alone (its ``top_k``
    filter, set to ``top_logprobs``; :attr:`adapters.base.Capabilities.top_k_drafts`)."""
    prefill: ChatPrefill | None = None
    """How its chat endpoint continues a partial assistant message (``None``: it cannot)."""
    prompt_logprobs: bool = False
    """Whether it scores given text (vLLM's ``prompt_logprobs`` and ``POST /tokenize``;
    :class:`adapters.base.TextScoringAdapter`)."""


LLAMA_CPP = ServerProfile(
    "llama.cpp",
    sampling_off=_frozen(top_k=0, min_p=0.0, repeat_penalty=1.0),
    top_k_drafts=True,
    prefill=ChatPrefill(),
)
VLLM = ServerProfile(
    "vllm",
    sampling_off=_frozen(top_k=-1, min_p=0.0, repetition_penalty=1.0),
    top_k_drafts=True,
    prefill=ChatPrefill(body=_frozen(continue_final_message=True, add_generation_prompt=False)),
    prompt_logprobs=True,
)
DEEPSEEK = ServerProfile("deepseek", prefill=ChatPrefill(message=_frozen(prefix=True)))
NONE = ServerProfile("none")

#: Every profile by its name, in the order of :data:`proxy.common.literals.Prefill`.
PROFILES: Mapping[str, ServerProfile] = MappingProxyType({p.name: p for p in (LLAMA_CPP, VLLM, DEEPSEEK, NONE)})


def server_profile(name: str) -> ServerProfile:
    """The profile named ``name``.

    Raises:
        ValueError: no such profile (the message names the valid ones).
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown server {name!r}; valid: {', '.join(PROFILES)}") from None
