"""Configuration: typed, frozen models loaded from TOML (pydantic validates,
and its messages name the bad key).

Example (``deltaproxy serve --config proxy.toml``)::

    [server]
    host = "127.0.0.1"
    port = 8000

    [models."smollm2-unlearned"]
    backend = "openai-completions"        # or "openai-chat", "llama-inprocess"
    base_url = "http://127.0.0.1:8080/v1"
    api_key_env = "UPSTREAM_API_KEY"       # the key itself never goes in the file
    template = "gguf:smollm2"              # chat template for raw completions
    pair = "smollm2"                       # local pair (folder, GGUF path or packaged name)
    offset = "offsets/demo"                # offset artifact folder
    alpha = 1.0

With no config file the embedded default serves ``smollm2-demo``: the
packaged SmolLM2 GGUF in-process as the remote and the same model as the pair.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from adapters.profiles import PROVIDERS
from proxy.common.literals import ClientAlpha, Prefill, ScopeAction
from proxy.pair.batcher import BatchSettings

DEFAULT_MODEL = "smollm2-demo"


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the key."""


class ClientKey(BaseModel):
    """One client API key (``[[server.keys]]``): only its sha256 is stored.

    ``deltaproxy hash-key`` makes a new key and prints the entry.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    """The key's name in metrics, logs and the audit log (never the key itself)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Lower-case hex sha256 of the key's UTF-8 text."""
    models: tuple[str, ...] = Field(default=("*",), min_length=1)
    """Served models this key may use; "*" is every model."""
    max_concurrent: int | None = Field(default=None, ge=1)
    """Requests in flight at once (default ``server.key_max_concurrent``)."""
    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute, moving window (default ``server.key_rpm``)."""

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    """Loopback by default: exposing the proxy is a deliberate choice."""
    port: int = Field(default=8000, ge=0, le=65535)
    default_max_tokens: int = Field(default=512, ge=1)
    """Used when a chat request sets no limit (bounds cost per request)."""
    max_tokens_limit: int = Field(default=4096, ge=1)
    """Larger max_tokens are refused at once (the embedded default's context is 4096 tokens)."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    """Largest upload to ``POST /v1/files`` (OpenAI's batch input limit is 200 MB)."""
    data_dir: str | None = None
    """Where uploaded files, batch outputs and their records are kept (default ``<cache>/server``)."""
    batch_concurrency: int = Field(default=4, ge=1)
    """Requests of one batch in flight at once."""
    batch_storage: str | None = Field(default=None, pattern=r"^(redis|rediss|redis\+unix)://")
    """Where file and batch records live: None, SQLite in ``data_dir`` (one process); a Redis
    URL, shared by the replicas that name it and mount one ``data_dir``: a batch runs on one
    replica at a time (a lease), another takes it over when that replica dies
    (:mod:`proxy.server.batch_store_redis`)."""
    batch_lease_seconds: float = Field(default=15.0, ge=1.0, le=600.0)
    """With ``batch_storage``: how long a batch's lease lasts unrenewed, so how soon another
    replica takes over the batch of one that died (renewed every third of it)."""
    keys: tuple[ClientKey, ...] = ()
    """Client API keys. None configured: no authentication (the loopback default)."""
    key_max_concurrent: int = Field(default=16, ge=1)
    """Default per-key limit of requests in flight (without keys: for all clients together)."""
    key_rpm: int = Field(default=600, ge=1)
    """Default per-key requests per minute (without keys: for all clients together)."""
    limits_storage: str | None = Field(default=None, pattern=r"^(redis|rediss|redis\+unix)://")
    """Where the per-minute request counts live: None, this process's memory; a Redis URL
    (``redis://host:6379/0``, ``rediss://``, ``redis+unix:///path``), shared by the replicas
    that name it, so a key's ``rpm`` holds across them (``limits``' Redis storage). Requests
    in flight are counted per replica."""
    audit_log: str | None = None
    """Append-only, hash-chained JSONL audit log (one line per request); None: off."""
    replica: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """This replica's name, in each audit line (``"replica"``) and for ``{replica}`` in
    ``audit_log`` (``audit-{replica}.jsonl``): one hash chain per replica. None:
    ``$DELTAPROXY_REPLICA``, else the host's name where ``audit_log`` holds ``{replica}``."""
    audit_log_text: bool = False
    """Also write prompt and output text into the audit log."""
    log_format: Literal["text", "json"] = "text"
    """Server log lines: plain text or JSON objects (with the request id)."""
    shutdown_timeout: float = Field(default=30.0, ge=0)
    """On SIGTERM: seconds in-flight requests get to finish before they are cancelled."""
    ready_timeout: float = Field(default=5.0, gt=0)
    """``GET /ready``: seconds each upstream gets to answer its model list."""
    pair_max_batch: int = Field(default=16, ge=1, le=256)
    """Requests whose tree passes one batched forward pass of a local pair may hold
    (proxy.pair.batcher.BatchSettings); 1 turns batching off."""
    pair_batch_window_ms: float = Field(default=5.0, ge=0, le=1000, allow_inf_nan=False)
    """How long a pass waits for requests still computing to bring theirs (never when all are queued)."""
    pair_max_batch_tokens: int = Field(default=256, ge=1, le=65536)
    """Tree positions in one batched pass after padding (a longer tree still runs, alone)."""

    pair_prefix_cache_tokens: int = Field(default=512, ge=0, le=1_000_000)
    """Tokens of recent prompts whose KV caches a local pair keeps, so that a prompt beginning
    like an earlier one (a system prompt) runs only its new tokens; about 92 KB per token for
    SmolLM2-135M's U and B. 0 turns it off."""

    def pair_batching(self) -> BatchSettings:
        """The ``pair_*`` keys as :class:`proxy.pair.batcher.BatchSettings`."""
        return BatchSettings(
            max_batch=self.pair_max_batch,
            window_s=self.pair_batch_window_ms / 1000,
            max_tokens=self.pair_max_batch_tokens,
        )

    @field_validator("limits_storage", "batch_storage")
    @classmethod
    def _redis_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        """A URL redis-py can build a client from (no connection is made here)."""
        if url is None:
            return None
        import redis

        try:
            client = redis.Redis.from_url(url)
            client.connection_pool.make_connection().disconnect()  # builds it, does not connect
            client.close()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{info.field_name}: not a Redis URL redis-py accepts ({exc})") from None
        return url

    @model_validator(mode="after")
    def _unique_keys(self) -> ServerConfig:
        if "default_max_tokens" in self.model_fields_set and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})"
            )
        ids = [k.id for k in self.keys]
        for kid in ids:
            if ids.count(kid) > 1:
                raise ValueError(f"keys: id {kid} appears more than once")
        for key in self.keys:
            same = [k.id for k in self.keys if k.sha256 == key.sha256]
            if len(same) > 1:
                raise ValueError(f"keys: {' and '.join(same)} have the same sha256 (the same key)")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: (
        Literal["openai-chat", "openai-completions", "openai-responses", "llama-inprocess", "transformers-inprocess"]
        | None
    ) = None
    """How the remote is reached; with ``provider`` set, the provider's (which may be overridden)."""
    provider: str | None = None
    """A hosted API or server kind (adapters.profiles.PROVIDERS: "openai", "openai-responses", "azure", "deepseek",
    "mistral", "together", "fireworks", "groq", "openrouter", "gemini", "anthropic", "vllm",
    "sglang", "llama.cpp", "ollama", "tgi"): it sets the backend, how a partial answer is
    continued, the logprob limit, the seed field, the endpoint and the key's variable, each of
    which the keys below may override."""
    # HTTP remotes
    base_url: str | None = None
    remote_model: str | None = None
    """The upstream's name for the model (default: the served name)."""
    api_key_env: str | None = None
    prefill: Prefill = "llama.cpp"
    """openai-chat only: how the upstream continues a partial assistant message ("none": it
    cannot); with ``provider``, the provider's unless set."""
    logprobs: bool | None = None
    """Whether the upstream gives top-k logprobs (None: the provider's; true without a provider)."""
    max_top_logprobs: int | None = Field(default=None, ge=1, le=20)
    """The most ``top_logprobs`` the upstream accepts (None: the provider's; 20 without one)."""
    seed: bool | None = None
    """Whether requests carry a seed (None: the provider's; true without one)."""
    probe: bool = False
    """HTTP remotes: at start-up, one cheap call (one token) asking for what the strategy needs
    (logprobs, a continued partial answer); a refusal stops ``serve`` with the upstream's message
    and the key to change (``logprobs``, ``max_top_logprobs``, ``prefill``)."""
    sampling: Literal["llama.cpp", "vllm", "deepseek", "none"] = "llama.cpp"
    """openai-completions: which server's switches turn its sampling filters off."""
    template: str | None = None
    """openai-completions: "gguf:<model>" (the GGUF's own), "chatml", "gemma", or a .jinja file."""
    eot_tokens: tuple[str, ...] | None = None
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    retry_attempts: int = Field(default=4, ge=1, le=20)
    retry_seconds: float = Field(default=30.0, gt=0)
    # llama-inprocess
    gguf: str | None = None
    n_ctx: int = Field(default=4096, ge=64)
    n_contexts: int = Field(default=8, ge=1, le=64)
    """llama-inprocess: prompt caches kept, so that up to this many concurrent choices do not
    re-evaluate each other's prompts; one llama.cpp context computes, the others wait as saved
    sequence states of their KV cells (about 23 kB per token for SmolLM2)."""
    # transformers-inprocess
    transformers_model: str | None = None
    """transformers-inprocess: a transformers model folder, a GGUF path or a packaged name
    (converted once, as the pair's models are)."""
    # the local pair and the offset
    pair: str | None = None
    offset: str | None = None
    """An offset artifact folder, or "demo": the embedded default's demo offset (pair "smollm2")."""
    alpha: float = Field(default=1.0, ge=-100, le=100, allow_inf_nan=False)
    """Offset strength; 1.0 as in the paper (arXiv 2404.11045)."""
    client_alpha: ClientAlpha = "at_least"
    """What a request's ``offset_alpha`` may do. "at_least": raise α above ``alpha``, never
    lower it, so that no client can weaken or switch off the unlearning; "any": set any α
    in [−100, 100], 0 and negative values included (comparisons; the embedded demo); "none":
    no request may set it. A refused value gets a 400 naming ``offset_alpha``."""
    offset_threshold: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | Literal["auto", "off"] = "auto"
    """Scope threshold τ (nats) under the rule ``offset_scope``: offsets above −τ (per candidate),
    or steps whose expected offset under the remote's distribution is above −τ, leave the
    remote's distribution unchanged (proxy.decoding.offset). "auto": the τ calibrated
    when the offset was trained (its manifest's ``offset_threshold``; none for offsets trained
    without it); "off": no threshold (with ``offset_gate = "off"`` too, the offset applies at
    every step: the paper's rule)."""
    offset_gate: Literal["auto", "off"] = "auto"
    """The offset's scope gate (proxy.decoding.scope_gate): a classifier over the pair's B
    row at each position, trained with the offset, outside which the offset is zero.
    "auto": the gate the offset was trained with (none for offsets trained without one);
    "off": the offset's Δ wherever τ lets it apply."""
    offset_scope: Literal["auto", "step", "token", "choice"] = "auto"
    """The rule by which τ leaves the offset out of scope (proxy.decoding.offset): "token", a
    candidate's offset applies only where it is at most −τ; "choice", as "token" but a step whose
    most likely candidate's offset is at most −τ takes its whole offset; "step", a step's offsets
    apply only where their mean under the remote's distribution is; "auto": the rule the offset's
    τ was calibrated for (its manifest's ``offset_scope``; "step" for offsets without one)."""
    top_k: int = Field(default=20, ge=1, le=20)
    """Remote candidates per step; 20 is OpenAI's top_logprobs maximum."""
    same_tokenizer: bool | Literal["auto"] = "auto"
    """Whether the pair shares the remote's tokenizer (fast path). "auto" detects it for in-process remotes."""
    decoding: Literal["auto", "token", "guided", "sequence"] = "auto"
    """"token": offset decoding token by token from the remote's top-k logprobs (needs a remote
    that gives logprobs and continues a partial answer); "guided": the remote drafts text, the
    pair's B stands in for its logprobs where the offset is in scope and the remote continues
    from the pair's token (a remote that continues but gives no logprobs); "sequence": complete
    samples re-ranked by the offset (a remote that cannot continue); "auto": token, guided or
    sequence, by what the remote can do (docs/providers.md)."""
    sequence_samples: int = Field(default=4, ge=1, le=16)
    """Sequence mode: samples drawn per answer (remote calls, made concurrently)."""
    refusal: str = Field(default="I can't help with that.", min_length=1)
    """Sequence mode: the answer when every sample is in forget scope and ``scope_action`` is "refuse"."""
    scope_action: ScopeAction = "refuse"
    """Sequence mode, when every sample is in forget scope (needs a scope threshold τ): "refuse"
    answers ``refusal``; "mask" answers the best sample with its in-scope spans replaced by
    "[REDACTED]" (whole words and names, as ``deltaproxy redact`` masks them); "rewrite" keeps
    the best sample up to its first in-scope word and lets the local pair write the rest under
    the offset (q ∝ p_B^(1/T)·exp(α·Δ) in scope: fluent, but the pair's, a smaller model's, text)."""
    speculative: bool = True
    """Speculative acceptance (docs/concepts.md): the remote drafts several tokens per call, each accepted
    with min(1, q/p) or replaced; the same output distribution as one call per token (false)."""
    max_draft_tokens: int = Field(default=128, ge=2, le=1024)
    """The longest draft one remote call is asked for; the decoder adapts below it to the acceptance
    rate and the measured cost of a call (proxy.decoding.speculative.DraftLength, DraftCost)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ValueError(f"provider: unknown provider {self.provider!r}; valid: {', '.join(PROVIDERS)}")
        if self.backend is None and self.provider is None:
            raise ValueError("backend or provider is required")
        if self.provider is not None:
            known = PROVIDERS[self.provider]
            if self.backend is not None and self.backend != known.backend:
                raise ValueError(
                    f"backend: provider {self.provider!r} is reached through {known.backend!r}, not "
                    f"{self.backend!r}; leave backend out"
                )
            if not self.base_url and not known.base_url:
                raise ValueError(
                    f"base_url is required for provider {self.provider!r} (it has no one public endpoint: "
                    "a self-hosted server, or Azure's per-resource one)"
                )
        elif self.backend in ("openai-chat", "openai-completions", "openai-responses") and not self.base_url:
            raise ValueError(f"base_url is required for backend {self.backend!r}")
        if self.provider is None and self.backend in ("llama-inprocess", "transformers-inprocess"):
            extra = {"logprobs", "max_top_logprobs", "seed", "prefill"} & self.model_fields_set
            if extra:
                raise ValueError(f"{sorted(extra)[0]}: only for HTTP remotes, not backend {self.backend!r}")
        if self.backend == "llama-inprocess" and not self.gguf:
            raise ValueError("gguf is required for backend 'llama-inprocess'")
        if self.backend == "transformers-inprocess" and not self.transformers_model:
            raise ValueError("transformers_model is required for backend 'transformers-inprocess'")
        if self.offset and not self.pair:
            raise ValueError("offset needs a pair (the local model it was trained on)")
        if self.offset == "demo" and self.pair != "smollm2":
            raise ValueError('offset "demo" was trained on the pair "smollm2"')
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {self.base_url!r} is not an http:// or https:// URL")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set")
        if self.provider is not None and not self.api_key_env:
            env = PROVIDERS[self.provider].api_key_env
            if env and env not in os.environ:
                raise ValueError(
                    f"provider {self.provider!r} reads its API key from {env}, which is not set "
                    "(set it, or name another variable with api_key_env)"
                )
        return self

    @property
    def remote_backend(self) -> str:
        """The backend: ``backend``, else the provider's."""
        if self.backend is not None:
            return self.backend
        assert self.provider is not None  # checked in _check
        return PROVIDERS[self.provider].backend

    @property
    def remote_base_url(self) -> str | None:
        """The endpoint: ``base_url``, else the provider's public one."""
        return self.base_url or (PROVIDERS[self.provider].base_url if self.provider else None)

    @property
    def remote_api_key_env(self) -> str | None:
        """The key's environment variable: ``api_key_env``, else the provider's."""
        return self.api_key_env or (PROVIDERS[self.provider].api_key_env if self.provider else None)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    server: ServerConfig = ServerConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _key_models(self) -> Config:
        for key in self.server.keys:
            unknown = [m for m in key.models if m != "*" and m not in self.models]
            if unknown:
                raise ValueError(f"server.keys (id {key.id}).models: no served model named {unknown[0]!r}")
        return self


def embedded_default(
    offset: str | None = None, alpha: float | None = None, offset_threshold: float | Literal["auto", "off"] = "auto"
) -> Config:
    """The embedded default (``make run``): SmolLM2 in-process as the remote, SmolLM2 as the pair."""
    try:
        model = ModelConfig(
            backend="llama-inprocess",
            gguf="smollm2",
            pair="smollm2",
            offset=offset,
            alpha=1.0 if alpha is None else alpha,
            offset_threshold=offset_threshold,
            client_alpha="any",  # the demo compares answers with and without its offset
        )
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "--alpha/--offset/--offset-threshold")) from exc
    return Config(models={DEFAULT_MODEL: model})


def _describe(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return f"{where} is invalid:\n" + "\n".join(lines)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config.

    Raises:
        ConfigError: unreadable file, bad TOML, or a bad key (named in the message).
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {p} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {p} is not valid TOML: {exc}") from exc
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"config {p}")) from exc
