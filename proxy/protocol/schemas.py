"""OpenAI wire schemas (requests), alone in one module; fields in OpenAI's order.

Source: the OpenAI API reference for ``POST /v1/chat/completions`` and
``POST /v1/completions``. Request fields the proxy cannot honour exactly
(penalties, ``logit_bias``, tools, ``echo``, ``suffix``, ``best_of`` > 1)
are refused with a 400 naming the field rather than silently ignored:
ignoring them would change results. Unknown fields are refused as OpenAI
does ("Unrecognized request argument supplied"). Types are strict: ``"5"``
is not an integer and ``"yes"`` is not a boolean, as in OpenAI's API.

The one extra field is ``offset_alpha``: α for this request (0 disables
the offset), where the model's ``client_alpha`` allows it (by default only
values at least the configured α).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_N = 16
MAX_TOP_LOGPROBS = 20
#: Fields the OpenAI API reference allows to be ``null``, meaning their default.
NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "n", "stream", "logprobs", "echo"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """OpenAI pads stream events against side channels; accepted, and no padding is added
    (the proxy's events are sent as they come)."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    """Required, as in OpenAI's API (an assistant message may go without it only with
    tool calls, which this server does not take)."""
    name: str | None = None

    @model_validator(mode="after")
    def _text(self) -> Message:
        content = self.content
        _encodable([p.text for p in content] if isinstance(content, list) else content, "messages")
        return self

    def as_plain(self) -> dict[str, Any]:
        """``{"role", "content"}`` with text parts joined (templates expect a string)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


def _encodable(value: Any, field: str) -> None:
    """Text fields must be valid Unicode: JSON escapes can smuggle in lone surrogates."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{field}: contains a lone surrogate ({exc.reason}); send valid Unicode text") from exc


def _check_unsupported(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, ok in defaults.items():
        if key in values and values[key] is not None and values[key] != ok:
            raise ValueError(f"{key}: not supported by the offset proxy (it would change the sampled distribution)")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    offset_alpha: float | None = Field(default=None, ge=-100.0, le=100.0)

    @field_validator("model", "user")
    @classmethod
    def _valid_text(cls, v: str | None, info: ValidationInfo) -> str | None:
        _encodable(v, str(info.field_name))
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and not 1 <= len(v) <= 4:
            raise ValueError("stop: give 1 to 4 strings")
        if any(not s for s in items):
            raise ValueError("stop: strings must not be empty")
        _encodable(items, "stop")
        return v

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, values: Any) -> Any:
        if isinstance(values, dict):
            _check_unsupported(values, {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}})
            # OpenAI's API reference marks these nullable: null means the default.
            values = {k: v for k, v in values.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        return values

    @model_validator(mode="after")
    def _stream_options(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Accepted as the SDK sends them, refused when they ask for something else.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # Accepted and not acted on: none of them changes the sampled distribution (OpenAI's
    # abuse-monitoring id, its prompt-cache routing key, its processing tier).
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError(
                "max_completion_tokens: give it alone; max_tokens (deprecated) asks for another limit at the same time"
            )
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format: give {'type': 'text'} (the only type supported)")
        if self.tools:
            raise ValueError("tools: not supported by the offset proxy")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: not supported by the offset proxy")
        return self

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Common):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        """OpenAI also takes token ids (a list of ints, or of lists of ints) in the model's
        own tokenizer; here the remote's and the pair's tokenizers differ, so ids would be
        ambiguous: a clear error instead of pydantic's "Input should be a valid string"."""
        if isinstance(value, list) and value:
            first = value[0]
            ids = isinstance(first, int) and not isinstance(first, bool)
            if ids or (isinstance(first, list) and first and isinstance(first[0], int)):
                raise ValueError(
                    "prompt: token-id prompts are not supported (the remote's and the offset pair's "
                    "tokenizers differ); send the prompt as text"
                )
        return value

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        _encodable(self.prompt, "prompt")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: give one prompt string (batched prompts are not supported)")
        if self.echo:
            raise ValueError("echo: not supported by the offset proxy")
        if self.suffix:
            raise ValueError("suffix: not supported by the offset proxy")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not supported by the offset proxy")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_budget(self, default: int) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions
