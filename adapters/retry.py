"""Retries for HTTP remotes (tenacity), and the one place where the openai
SDK's exceptions become :mod:`adapters.base` errors.

Retried: 408, 409, 429 and 5xx statuses, timeouts and connection errors.
The wait honours ``Retry-After`` (seconds or an HTTP date, RFC 9110 §10.2.3)
and otherwise backs off exponentially with jitter; both the number of attempts
and the total time are bounded, after which the last error is raised as
:class:`~adapters.base.RemoteUnavailable`.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_exponential_jitter

from .base import ContextExhausted, RemoteBadResponse, RemoteError, RemoteRejected, RemoteUnavailable

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds for retrying one remote call."""

    attempts: int = 4
    """Total attempts, the first included."""
    total_seconds: float = 30.0
    """No new attempt starts after this long; a Retry-After beyond it is not waited for."""
    initial_backoff: float = 0.25
    max_backoff: float = 8.0


DEFAULT_RETRY = RetryPolicy()


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in RETRY_STATUSES


def retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds asked for by the ``Retry-After`` (or ``retry-after-ms``) header of ``exc``'s response."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


async def call_with_retries(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str, *, secret: str | None = None
) -> T:
    """Run ``fn`` under ``policy`` and translate SDK errors once. ``secret``
    (the upstream's API key) is blanked out of every error message, also of
    one the upstream echoed it in.

    Raises:
        RemoteUnavailable: retryable failures that outlived the policy.
        RemoteRejected: a non-retryable 4xx.
        RemoteBadResponse: the SDK could not parse the answer.
    """
    try:
        return await _call(fn, policy, what)
    except RemoteError as exc:
        if secret and secret in str(exc):
            exc.args = (str(exc).replace(secret, "[upstream API key]"),)
        raise


async def _call(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    backoff = wait_exponential_jitter(multiplier=policy.initial_backoff, max=policy.max_backoff)
    started = time.monotonic()

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after_seconds(exc) if exc is not None else None
        base = backoff(state)
        delay = max(base, asked) if asked is not None else base
        left = policy.total_seconds - (time.monotonic() - started)
        return max(0.0, min(delay, left))

    retrying = AsyncRetrying(
        retry=retry_if_exception(_retryable),
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_seconds),
        wait=wait,
        reraise=True,
    )
    try:
        return await retrying(fn)
    except RemoteError:
        raise
    except openai.APITimeoutError as exc:
        raise RemoteUnavailable(f"{what}: upstream timed out after retries", timeout=True) from exc
    except openai.APIConnectionError as exc:
        raise RemoteUnavailable(f"{what}: cannot reach the upstream ({type(exc.__cause__ or exc).__name__})") from exc
    except openai.APIStatusError as exc:
        message = f"{what}: upstream answered HTTP {exc.status_code}: {_upstream_message(exc)}"
        if context_exhausted(exc.status_code, exc.body, _upstream_message(exc)):
            raise ContextExhausted(message) from exc
        if exc.status_code in RETRY_STATUSES:
            raise RemoteUnavailable(message, timeout=exc.status_code in (408, 504), status=exc.status_code) from exc
        raise RemoteRejected(message, status=exc.status_code) from exc
    except (openai.APIResponseValidationError, ValueError, KeyError, TypeError) as exc:
        raise RemoteBadResponse(f"{what}: unusable upstream answer: {exc}") from exc


#: How servers say that the prompt plus ``max_tokens`` does not fit their context
#: (OpenAI, vLLM, SGLang, llama.cpp's llama-server, llama-cpp-python).
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_MESSAGE = re.compile(
    r"maximum context length is|maximum model length|greater than max_model_len|exceeds? context window of|"
    r"exceeds? (the )?(available )?context (size|window|length)|longer than the model's context|"
    r"max_tokens must be at least 1, got 0",  # vLLM, when the prompt leaves no room at all
    re.IGNORECASE,
)


def context_exhausted(status: int, body: object, message: str) -> bool:
    """Whether an HTTP error says the context window is full: a 400 or 413 whose
    ``error.code`` / ``error.type`` is one of :data:`_CONTEXT_CODES` (OpenAI's
    ``context_length_exceeded``, llama-server's ``exceed_context_size_error``) or
    whose message matches :data:`_CONTEXT_MESSAGE` (vLLM: "This model's maximum
    context length is 2048 tokens...", llama-cpp-python: "exceed context window of N").
    The decoder answers it by asking for shorter drafts, not by retrying."""
    if status not in (400, 413):
        return False
    inner = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(inner, dict) and any(
        isinstance(inner.get(field), str) and inner[field] in _CONTEXT_CODES for field in ("code", "type")
    ):
        return True
    return bool(_CONTEXT_MESSAGE.search(message))


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:500]
        if isinstance(inner, str):
            return inner[:500]
    return str(exc.message)[:500]
