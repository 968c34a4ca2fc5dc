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

    name: str
    """The config's value that names it (a ``prefill`` / ``sampling`` value, or a provider's name)."""
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
    logprobs: bool = True
    """Whether it gives top-k logprobs of its answers (``logprobs`` / ``top_logprobs``)."""
    max_top_logprobs: int = 20
    """The most ``top_logprobs`` it accepts (OpenAI's maximum is 20)."""
    token_count: tuple[str, str] | None = None
    """Where under the server's root a prompt's tokens are counted, and the body field that
    carries the text (``POST {field: text}`` → ``{"count": n}``: llama-cpp-python's
    ``/extras/tokenize/count``, vLLM's ``/tokenize``): the usage of a streamed draft that
    reports none (llama-cpp-python's streams never do; a stream closed early has no end)."""
    tokenize_chat: bool = False
    """Whether that endpoint also counts chat messages (``{"messages": …}`` with the prefill's
    body fields, vLLM's ``/tokenize``): the chat adapter streams drafts only then."""
    seed_field: str | None = "seed"
    """The request field that seeds its sampling (``seed``; Mistral's ``random_seed``); ``None``:
    it takes none, and none is sent."""
    wire_bytes: bool = True
    """Whether the ``bytes`` of its logprob entries can be trusted (Ollama's are wrong for partial
    UTF-8 characters: they are then recovered from the token strings, or marked unknown)."""


LLAMA_CPP = ServerProfile(
    "llama.cpp",
    sampling_off=_frozen(top_k=0, min_p=0.0, repeat_penalty=1.0),
    top_k_drafts=True,
    prefill=ChatPrefill(),
    token_count=("/extras/tokenize/count", "input"),
)
VLLM = ServerProfile(
    "vllm",
    sampling_off=_frozen(top_k=-1, min_p=0.0, repetition_penalty=1.0),
    top_k_drafts=True,
    prefill=ChatPrefill(body=_frozen(continue_final_message=True, add_generation_prompt=False)),
    prompt_logprobs=True,
    token_count=("/tokenize", "prompt"),
    tokenize_chat=True,
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


@dataclass(frozen=True, slots=True)
class Provider:
    """A hosted API or server kind as a model's config names it (``provider = "openai"``):
    which adapter talks to it, its server profile (how it continues a partial answer, its
    logprob limit, its seed field), whether it takes ``n`` > 1, and its public endpoint.

    Sources: each provider's public API reference and SDK types (the docs' provider table
    says which); a hosted model list changes monthly, so every capability can be overridden
    per model (:class:`proxy.config.ModelConfig`'s ``logprobs``, ``max_top_logprobs``,
    ``prefill``, ``seed``).
    """

    name: str
    backend: str
    """``"openai-chat"``, ``"openai-completions"`` (the chat template rendered by the proxy) or
    ``"openai-responses"`` (:mod:`adapters.openai_responses`)."""
    profile: ServerProfile
    n: bool = True
    """Whether it answers ``n`` > 1 in one call (sequence mode otherwise makes one call per sample)."""
    base_url: str | None = None
    """Its public endpoint (``None``: a self-hosted server; ``base_url`` must be set)."""
    api_key_env: str | None = None
    """The environment variable its key is read from by default."""


_TRAILING = ChatPrefill()  # a trailing assistant message is continued
_PREFIX = ChatPrefill(message=_frozen(prefix=True))
_CONTINUE = ChatPrefill(body=_frozen(continue_final_message=True, add_generation_prompt=False))


def _hosted(name: str, **fields: Any) -> ServerProfile:
    return ServerProfile(name, **fields)


#: Every provider by its config name (the docs' provider table lists the same rows).
PROVIDERS: Mapping[str, Provider] = MappingProxyType(
    {
        p.name: p
        for p in (
            Provider(
                "openai",
                "openai-chat",
                _hosted("openai"),
                base_url="https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
            ),
            Provider(
                "openai-responses",
                "openai-responses",
                _hosted("openai-responses", seed_field=None),
                n=False,
                base_url="https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
            ),
            Provider("azure", "openai-chat", _hosted("azure"), api_key_env="AZURE_OPENAI_API_KEY"),
            Provider(
                "deepseek",
                "openai-chat",
                _hosted("deepseek", prefill=_PREFIX, seed_field=None),
                n=False,
                base_url="https://api.deepseek.com/beta",
                api_key_env="DEEPSEEK_API_KEY",
            ),
            Provider(
                "mistral",
                "openai-chat",
                _hosted("mistral", prefill=_PREFIX, logprobs=False, seed_field="random_seed"),
                base_url="https://api.mistral.ai/v1",
                api_key_env="MISTRAL_API_KEY",
            ),
            Provider(
                "together",
                "openai-completions",
                _hosted("together"),
                base_url="https://api.together.xyz/v1",
                api_key_env="TOGETHER_API_KEY",
            ),
            Provider(
                "fireworks",
                "openai-completions",
                _hosted("fireworks"),
                base_url="https://api.fireworks.ai/inference/v1",
                api_key_env="FIREWORKS_API_KEY",
            ),
            Provider(
                "groq",
                "openai-chat",
                _hosted("groq", prefill=_TRAILING, logprobs=False),
                n=False,
                base_url="https://api.groq.com/openai/v1",
                api_key_env="GROQ_API_KEY",
            ),
            Provider(
                "openrouter",
                "openai-chat",
                _hosted("openrouter", prefill=_TRAILING, logprobs=False),
                n=False,
                base_url="https://openrouter.ai/api/v1",
                api_key_env="OPENROUTER_API_KEY",
            ),
            Provider(
                "gemini",
                "openai-chat",
                _hosted("gemini", prefill=_TRAILING, logprobs=False),
                base_url="https://generativelanguage.googleapis.com/v1beta/openai",
                api_key_env="GEMINI_API_KEY",
            ),
            Provider(
                "anthropic",
                "openai-chat",
                _hosted("anthropic", prefill=_TRAILING, logprobs=False, seed_field=None),
                n=False,
                base_url="https://api.anthropic.com/v1",
                api_key_env="ANTHROPIC_API_KEY",
            ),
            Provider("vllm", "openai-chat", VLLM),
            Provider("sglang", "openai-chat", ServerProfile("sglang", prefill=_CONTINUE)),
            Provider("llama.cpp", "openai-chat", LLAMA_CPP, n=False),
            Provider(
                "ollama",
                "openai-chat",
                _hosted("ollama", prefill=_TRAILING, seed_field=None, wire_bytes=False),
                n=False,
                base_url="http://127.0.0.1:11434/v1",
            ),
            Provider(
                "tgi", "openai-chat", _hosted("tgi", prefill=_CONTINUE, max_top_logprobs=5, seed_field=None), n=False
            ),
        )
    }
)


def provider(name: str) -> Provider:
    """The provider named ``name``.

    Raises:
        ValueError: no such provider (the message names the valid ones).
    """
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}") from None


def prefill_of(name: str) -> ChatPrefill | None:
    """How the ``prefill`` setting ``name`` continues a partial assistant message (a server
    profile's name: ``llama.cpp``, ``vllm``, ``deepseek`` or ``none``).

    Raises:
        ValueError: no such profile.
    """
    return server_profile(name).prefill
