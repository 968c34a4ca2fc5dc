"""Orchestration between the routes and the decoder: runs the choices of one
request and shapes OpenAI response objects and stream chunks (plain dicts).

Shapes follow the OpenAI API reference: ``chat.completion``,
``chat.completion.chunk``, ``text_completion``; logprobs for chat as
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` and for
completions as ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.
The logprobs are the proxy's own: of q, the distribution it sampled from.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from adapters.base import Context
from proxy.common.aio import gather_or_cancel
from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.decoding.types import ChoiceStats, Piece, SamplingParams, TokenOut
from proxy.protocol.errors import ProxyError, invalid
from proxy.protocol.schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class Job:
    """One validated request, ready to decode."""

    kind: str  # "chat" | "text"
    model: ServedModel
    context: Context
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    stats: list[ChoiceStats] = field(default_factory=list)


def _requested_alpha(model: ServedModel, value: float) -> float:
    """A request's ``offset_alpha``, where the model's ``client_alpha`` allows it.

    Raises:
        ProxyError: 400 (param ``offset_alpha``) when the model refuses the value.
    """
    if model.client_alpha == "none":
        raise invalid(
            f"offset_alpha: model '{model.name}' does not let requests set the offset strength",
            "offset_alpha",
            "offset_alpha_not_allowed",
        )
    if model.client_alpha == "at_least" and value < model.alpha:
        raise invalid(
            f"offset_alpha: model '{model.name}' does not let requests weaken its offset: "
            f"α must be at least {model.alpha:g} (got {value:g})",
            "offset_alpha",
            "offset_alpha_not_allowed",
        )
    return value


def make_job(
    req: ChatCompletionRequest | CompletionRequest, models: dict[str, ServedModel], settings: ServerConfig
) -> Job:
    """Resolve the model and decoding settings of a validated request.

    Raises:
        ProxyError: unknown model (404), ``max_tokens`` above the server's limit, or an
            ``offset_alpha`` the model refuses (400).
    """
    model = models.get(req.model)
    if model is None:
        raise ProxyError(
            404, f"The model '{req.model}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    # A request without a limit gets the default, never more than the server's limit.
    budget = req.token_budget(min(settings.default_max_tokens, settings.max_tokens_limit))
    if budget > settings.max_tokens_limit:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise invalid(f"{field}: at most {settings.max_tokens_limit} on this server (got {budget})", field)
    alpha = model.alpha if req.offset_alpha is None else _requested_alpha(model, req.offset_alpha)
    if isinstance(req, ChatCompletionRequest):
        ctx = Context(messages=tuple(m.as_plain() for m in req.messages))
        logprobs, top = req.logprobs, req.top_logprobs or 0
        kind = "chat"
    else:
        ctx = Context(prompt=req.prompt_text())
        logprobs, top = req.logprobs is not None, req.logprobs or 0
        kind = "text"
    params = SamplingParams(
        max_tokens=budget,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        logprobs=logprobs,
        top_logprobs=top,
        alpha=alpha,
        offset_threshold=model.offset_threshold,
        offset_scope=model.offset_scope,
    )
    if logprobs and model.mode == "sequence":
        raise invalid(
            f"logprobs: model '{req.model}' is served in sequence mode (its upstream cannot continue a "
            "partial answer), which has no per-token logprobs",
            "logprobs",
        )
    if logprobs and model.mode == "guided":
        raise invalid(
            f"logprobs: model '{req.model}' is served in guided mode (its upstream gives no logprobs), "
            "which has no per-token logprobs",
            "logprobs",
        )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    job = Job(kind, model, ctx, params, req.n, req.stream, include_usage)
    if kind == "text":
        job.id = f"cmpl-{uuid.uuid4().hex}"
    return job


# ------------------------------------------------------------------ logprobs
def _chat_entry(t: TokenOut) -> dict[str, Any]:
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.data),
        "top_logprobs": [
            {"token": tok, "logprob": lp, "bytes": None if b is None else list(b)} for tok, b, lp in t.top
        ],
    }


def chat_logprobs(tokens: list[TokenOut]) -> dict[str, Any]:
    return {"content": [_chat_entry(t) for t in tokens], "refusal": None}


def text_logprobs(tokens: list[TokenOut], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.data.decode("utf-8", "ignore"))
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{tok: lp for tok, _, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def usage(job: Job) -> dict[str, int]:
    prompt = next((s.prompt_tokens for s in job.stats if s.prompt_tokens is not None), 0) or 0
    completion = sum(s.completion_tokens for s in job.stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ------------------------------------------------------------------ non-streamed
async def complete(job: Job) -> dict[str, Any]:
    """Run every choice to the end and build the response object."""
    job.stats = [ChoiceStats() for _ in range(job.n)]

    async def one(i: int) -> tuple[str, list[TokenOut], str]:
        text, tokens, finish = [], [], "length"
        async for piece in job.model.generate(job.context, job.params, index=i, stats=job.stats[i]):
            text.append(piece.text)
            tokens.extend(piece.tokens)
            if piece.finish_reason:
                finish = piece.finish_reason
        return "".join(text), tokens, finish

    results = await gather_or_cancel(*(one(i) for i in range(job.n)))  # one failed choice stops the rest
    choices = []
    for i, (text, tokens, finish) in enumerate(results):
        if job.kind == "chat":
            choices.append(
                {
                    "index": i,
                    # A refusal from the scope action in OpenAI's place for refusals, content null.
                    "message": (
                        {"role": "assistant", "content": None, "refusal": text}
                        if job.stats[i].refused
                        else {"role": "assistant", "content": text, "refusal": None}
                    ),
                    "logprobs": chat_logprobs(tokens) if job.params.logprobs else None,
                    "finish_reason": finish,
                }
            )
        else:
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": text_logprobs(tokens, 0) if job.params.logprobs else None,
                    "finish_reason": finish,
                }
            )
    return {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model.name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(job),
    }


# ------------------------------------------------------------------ streamed
def _chunk(job: Job, choices: list[dict[str, Any]], usage_value: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model.name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_value,
    }


async def stream(job: Job) -> AsyncGenerator[dict[str, Any], None]:
    """Chunks in OpenAI's streaming format (without the ``[DONE]`` sentinel).

    Each content chunk carries the logprobs of its own tokens; exactly one
    chunk per choice has a finish reason; with ``include_usage`` one last
    chunk has ``choices: []`` and the usage. A chat choice that the scope action refused
    streams its text as ``delta.refusal``. Errors propagate to the caller,
    which turns them into an SSE error event.
    """
    job.stats = [ChoiceStats() for _ in range(job.n)]
    queue: asyncio.Queue[tuple[int, Piece | BaseException]] = asyncio.Queue()
    offsets = [0] * job.n

    async def run(i: int) -> None:
        try:
            async for piece in job.model.generate(job.context, job.params, index=i, stats=job.stats[i]):
                await queue.put((i, piece))
        except Exception as exc:  # forwarded to the consumer, which raises it
            await queue.put((i, exc))

    started = [False] * job.n
    tasks = [asyncio.create_task(run(i)) for i in range(job.n)]
    try:
        finished = 0
        while finished < job.n:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                finished += 1
            if not item.text and not item.tokens and item.finish_reason is None:
                continue
            if job.kind == "chat":
                if not started[i]:  # the role chunk, once the choice's first step has succeeded
                    started[i] = True
                    role = {"role": "assistant", "content": ""}
                    yield _chunk(job, [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
                field = "refusal" if job.stats[i].refused else "content"
                delta = {field: item.text} if (item.text or item.tokens) else {}
                logprobs = chat_logprobs(item.tokens) if job.params.logprobs and item.tokens else None
                yield _chunk(
                    job, [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": item.finish_reason}]
                )
            else:
                logprobs = text_logprobs(item.tokens, offsets[i]) if job.params.logprobs and item.tokens else None
                offsets[i] += len(item.text)
                yield _chunk(
                    job, [{"index": i, "text": item.text, "logprobs": logprobs, "finish_reason": item.finish_reason}]
                )
        if job.include_usage:
            yield _chunk(job, [], usage(job))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
