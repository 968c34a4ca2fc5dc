"""Builds the served models (remote adapter + local pair + α) from a :class:`Config`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from adapters.base import EOT_TOKENS, Capabilities, RemoteAdapter, SamplingAdapter
from adapters.llama_inprocess import LlamaInProcessAdapter
from adapters.openai_chat import ChatAdapter
from adapters.openai_completions import CompletionsAdapter
from adapters.openai_responses import ResponsesAdapter
from adapters.profiles import ServerProfile, prefill_of, provider, server_profile
from adapters.retry import RetryPolicy
from adapters.templates import BUILTIN, ChatTemplate
from adapters.transformers_inprocess import TransformersInProcessAdapter
from proxy.common.literals import DecodingMode, ScopeRule
from proxy.config import Config, ConfigError, ModelConfig
from proxy.decoding.served import ServedModel
from proxy.decoding.types import DecodingError
from proxy.pair import compute
from proxy.pair.model_files import check_model_ref, local_model_dir, resolve_gguf

log = logging.getLogger(__name__)


def _gguf_template(ref: str) -> ChatTemplate:
    """The chat template and its special tokens from a GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(resolve_gguf(ref)))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    source = field("tokenizer.chat_template")
    if not source:
        raise ConfigError(f"template: GGUF {ref} has no chat template")
    tokens = field("tokenizer.ggml.tokens")
    bos = field("tokenizer.ggml.bos_token_id")
    eos = field("tokenizer.ggml.eos_token_id")
    return ChatTemplate(source, tokens[bos] if bos is not None else "", tokens[eos] if eos is not None else "")


def _template(spec: str | None) -> ChatTemplate | None:
    if spec is None:
        return None
    if spec.startswith("gguf:"):
        return _gguf_template(spec[5:])
    if spec in BUILTIN:
        return ChatTemplate(BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"template: {spec!r} is not 'gguf:<model>', {', '.join(BUILTIN)} or a file")
    return ChatTemplate(path.read_text())


def remote_profile(cfg: ModelConfig) -> ServerProfile:
    """The server profile of an HTTP remote: its provider's (``provider``) or the one that
    ``prefill`` (openai-chat) or ``sampling`` (openai-completions) names, with the model's
    capability overrides (``prefill`` where set beside a provider, ``logprobs``,
    ``max_top_logprobs``, ``seed``) applied.

    Raises:
        ValueError: an unknown provider or server profile (the message names the valid ones).
    """
    if cfg.provider is not None:
        profile = provider(cfg.provider).profile
        if "prefill" in cfg.model_fields_set:
            profile = replace(profile, prefill=prefill_of(cfg.prefill))
    elif cfg.remote_backend == "openai-chat":
        profile = server_profile(cfg.prefill)
    else:
        profile = server_profile(cfg.sampling)
    if cfg.logprobs is not None:
        profile = replace(profile, logprobs=cfg.logprobs)
    if cfg.max_top_logprobs is not None:
        profile = replace(profile, max_top_logprobs=cfg.max_top_logprobs)
    if cfg.seed is not None:
        profile = replace(profile, seed_field=(profile.seed_field or "seed") if cfg.seed else None)
    return profile


def build_adapter(name: str, cfg: ModelConfig, *, http_client: Any = None) -> RemoteAdapter:
    """The remote adapter of the model's backend (``backend``, or its provider's); an HTTP one
    gets its :func:`remote_profile`. ``http_client`` (an ``openai.DefaultAsyncHttpxClient``)
    replaces the HTTP adapters' own (tests pass one with a mock transport).

    Raises:
        ValueError: an unknown server profile (the message names the valid ones).
        FileNotFoundError: a model file or folder is missing.
    """
    backend = cfg.remote_backend
    if backend == "llama-inprocess":
        assert cfg.gguf is not None
        path = resolve_gguf(cfg.gguf)
        # on the pairs' compute thread, with its intra-op threads (proxy.pair.compute)
        return compute.run(
            functools.partial(
                LlamaInProcessAdapter,
                name=name,
                model_path=path,
                n_ctx=cfg.n_ctx,
                n_contexts=cfg.n_contexts,
                n_threads=compute.threads(),
                executor=compute.executor(),
            )
        )
    if backend == "transformers-inprocess":
        from proxy.pair.lean import LeanDecoder  # here: it imports torch

        assert cfg.transformers_model is not None
        folder = local_model_dir(cfg.transformers_model)
        return compute.run(
            functools.partial(
                TransformersInProcessAdapter,
                name=name,
                model_dir=folder,
                executor=compute.executor(),
                body=LeanDecoder.build,
            )
        )
    key_env = cfg.remote_api_key_env
    base_url = cfg.remote_base_url
    assert base_url is not None  # checked by ModelConfig
    common: dict[str, Any] = dict(
        name=name,
        base_url=base_url,
        model=cfg.remote_model or name,
        api_key=os.environ.get(key_env) if key_env else None,
        eot_tokens=cfg.eot_tokens if cfg.eot_tokens is not None else EOT_TOKENS,
        retry=RetryPolicy(attempts=cfg.retry_attempts, total_seconds=cfg.retry_seconds),
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        http_client=http_client,
        profile=remote_profile(cfg),
    )
    if backend == "openai-chat":
        return ChatAdapter(**common)
    if backend == "openai-responses":
        return ResponsesAdapter(**common)
    return CompletionsAdapter(template=_template(cfg.template), **common)


def decoding_mode(capabilities: Capabilities) -> DecodingMode:
    """``decoding = "auto"``: the strategy for what the remote can do (docs/providers.md):
    logprobs and continuing, token mode; continuing alone, guided mode; otherwise sequence mode."""
    if capabilities.can_continue:
        return "token" if capabilities.logprobs else "guided"
    return "sequence"


def shares_tokenizer(adapter: RemoteAdapter, pair: Any) -> bool:
    """``same_tokenizer = "auto"``: whether the remote reports its vocabulary's bytes
    (``vocab_bytes``, in-process remotes) and they are the pair's, token for token (special
    tokens, whose bytes are unknown, skipped). False when either side is missing."""
    vocab_bytes = getattr(adapter, "vocab_bytes", None)
    if pair is None or vocab_bytes is None:
        return False
    remote = vocab_bytes()
    return len(remote) == len(pair.vocab) and all(
        a == b for a, b in zip(remote, pair.vocab.token_bytes, strict=True) if a is not None and b is not None
    )


def served_threshold(setting: float | str, pair: Any) -> float | None:
    """τ for ``offset_threshold`` = ``setting``: a number as it is; "auto" the offset's
    calibrated τ (its manifest's; None when it has none, or without an offset); "off" None."""
    if setting == "off":
        return None
    if setting == "auto":
        offset = getattr(pair, "offset", None)
        return offset.offset_threshold if offset is not None else None
    return float(setting)


def served_scope(setting: str, pair: Any) -> ScopeRule:
    """The scope rule for ``offset_scope`` = ``setting``: "step", "token" or "choice" as it is; "auto" the
    rule the offset's τ was calibrated for (its manifest's; "step" without one, or without an offset)."""
    if setting != "auto":
        return cast(ScopeRule, setting)
    offset = getattr(pair, "offset", None)
    return offset.offset_scope if offset is not None else "step"


def build_model(
    name: str,
    cfg: ModelConfig,
    *,
    pairs: dict[tuple[str, str | None, str], Any] | None = None,
    batching: Any = None,
    prefix_cache_tokens: int = 512,
    resolve_offset: Callable[[str], Path] | None = None,
    http_client: Any = None,
) -> ServedModel:
    """One served model. Pairs are shared between models with the same (pair, offset);
    a new pair batches its tree passes with ``batching`` (a :class:`proxy.pair.batcher.BatchSettings`,
    default its defaults) and keeps ``prefix_cache_tokens`` of prompts' KV caches.

    ``resolve_offset`` turns a named offset (``"demo"``) into its artifact folder; the
    command line passes :func:`proxy.training.demo.demo_offset`'s resolver, which trains the
    demo offset on first use (serving itself never imports training).

    Raises:
        ConfigError: the model cannot be served as configured.
    """
    pairs = {} if pairs is None else pairs
    try:
        adapter = build_adapter(name, cfg, http_client=http_client)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"models.{name}: {exc}") from exc
    pair = None
    if cfg.pair:
        try:
            check_model_ref(cfg.pair)
        except FileNotFoundError as exc:
            raise ConfigError(f"models.{name}.pair: {exc}") from exc
    if cfg.pair and cfg.offset:  # without an offset U = B and Δ ≡ 0: no pair needed
        from proxy.pair.local import LocalPair  # torch and transformers: loaded only where a pair serves

        key = (cfg.pair, cfg.offset, cfg.offset_gate)
        if key not in pairs:
            offset_dir = cfg.offset
            if cfg.offset == "demo":  # the embedded default's demo offset (trained once, then cached)
                if resolve_offset is None:
                    raise ConfigError(
                        f'models.{name}.offset: "demo" is trained on first use by the command line '
                        "(deltaproxy serve); here pass resolve_offset or an artifact folder"
                    )
                offset_dir = str(resolve_offset(cfg.offset))
            try:
                pairs[key] = LocalPair.load(
                    cfg.pair,
                    offset_dir,
                    batching=batching,
                    prefix_cache_tokens=prefix_cache_tokens,
                    gate=cfg.offset_gate == "auto",
                )
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"models.{name}.offset: {exc}") from exc
        pair = pairs[key]
    same = cfg.same_tokenizer
    if same == "auto":
        same = shares_tokenizer(adapter, pair)
    alpha = cfg.alpha
    if cfg.decoding in ("sequence", "guided") and not isinstance(adapter, SamplingAdapter):
        raise ConfigError(
            f"models.{name}.decoding: backend {cfg.remote_backend!r} gives logprobs and continues answers "
            'itself; use "token" (or "auto")'
        )
    try:
        return ServedModel(
            name=name,
            adapter=adapter,
            pair=pair,
            alpha=alpha,
            client_alpha=cfg.client_alpha,
            offset_threshold=served_threshold(cfg.offset_threshold, pair),
            offset_scope=served_scope(cfg.offset_scope, pair),
            # the remote's candidates per step in token mode; B's in guided mode
            top_k=min(cfg.top_k, adapter.capabilities.max_top_logprobs) if adapter.capabilities.logprobs else cfg.top_k,
            same_tokenizer=bool(same),
            speculative=cfg.speculative,
            mode=cfg.decoding if cfg.decoding != "auto" else decoding_mode(adapter.capabilities),
            sequence_samples=cfg.sequence_samples,
            refusal=cfg.refusal,
            scope_action=cfg.scope_action,
            max_draft_tokens=cfg.max_draft_tokens,
            offset_sha256=pair.offset.sha256 if pair is not None and pair.offset is not None else None,
        )
    except DecodingError as exc:
        raise ConfigError(str(exc)) from exc


def build_models(config: Config, *, resolve_offset: Callable[[str], Path] | None = None) -> dict[str, ServedModel]:
    """Every model of ``config`` (:func:`build_model`), pairs shared between them.

    Raises:
        ConfigError: a model cannot be served as configured.
    """
    pairs: dict[tuple[str, str | None, str], Any] = {}
    batching, cached = config.server.pair_batching(), config.server.pair_prefix_cache_tokens
    return {
        name: build_model(
            name, cfg, pairs=pairs, batching=batching, prefix_cache_tokens=cached, resolve_offset=resolve_offset
        )
        for name, cfg in config.models.items()
    }
