"""OpenAI's Responses API on the proxy's side (``POST /v1/responses``): the request schema, its
translation into a chat job, and the ``response`` object and typed stream events built from
the job's pieces (plain dicts).

Source: the OpenAI API reference for ``POST /v1/responses`` and the openai SDK's types
(``openai.types.responses``: ``Response``, ``ResponseOutputMessage``, ``ResponseOutputText``,
``ResponseOutputRefusal``, ``ResponseUsage`` and the ``response.*`` stream events).

- ``input``: a string, or a list of message items (``{"role", "content"}`` with ``content``
  a string or ``input_text`` / ``output_text`` parts, ``type: "message"`` optional);
  ``instructions`` becomes a leading system message.
- ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, ``top_logprobs`` with
  ``include: ["message.output_text.logprobs"]``, ``metadata`` (echoed), ``user``,
  ``offset_alpha`` (the proxy's one extra field, as on chat).
- Fields the proxy cannot honour are refused with a 400 naming them (tools, previous
  response ids, stored responses, reasoning, background runs, non-text formats, other
  ``include`` values and input item types); unknown fields as OpenAI refuses them.
- A sequence-mode answer that the scope action refused comes back as a ``refusal`` content
  part (the SDK's ``output_text`` is then empty), as OpenAI's refusals do.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy.decoding.types import ChoiceStats, Piece, TokenOut
from proxy.protocol.choices import Job
from proxy.protocol.schemas import MAX_TOP_LOGPROBS, ChatCompletionRequest, ContentPart, Message, _encodable

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(BaseModel):
    """An input message item (the SDK's ``EasyInputMessageParam`` / ``ResponseInputItemParam``
    message): other item types (tool outputs, images, files) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def as_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else [ContentPart(type="text", text=p.text) for p in self.content]
        return Message(role=self.role, content=content)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    format: TextFormat | None = None


#: Content part types of input messages: text the proxy can pass on (a refusal in an earlier
#: assistant turn is its text).
TEXT_PARTS = ("input_text", "output_text", "refusal")


def _input_item(i: int, item: Any) -> Any:
    """An input item as :class:`InputMessage` takes it; an item or part of another type is a
    clear error naming it (not pydantic's guess at the member it looks most like)."""
    if not isinstance(item, dict):
        return item
    kind = item.get("type", "message")
    if kind != "message":
        raise ValueError(f"input: input[{i}] is a {kind!r} item; the offset proxy takes message items only")
    parts = item.get("content")
    if isinstance(parts, list):
        fixed = []
        for j, part in enumerate(parts):
            ptype = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, dict) and ptype not in TEXT_PARTS:
                raise ValueError(
                    f"input: input[{i}].content[{j}] is a {ptype!r} part; the offset proxy takes text parts only"
                )
            if ptype == "refusal":
                part = {"type": "output_text", "text": part.get("refusal")}
            fixed.append(part)
        item = {**item, "content": fixed}
    return item


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` (module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto"] | None = None
    stream_options: dict[str, Any] | None = None
    # Accepted only with the value that asks for nothing the proxy cannot do.
    store: bool | None = None
    background: bool | None = None
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    reasoning: Any = None
    prompt: Any = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    service_tier: str | None = None
    offset_alpha: float | None = Field(default=None, ge=-100.0, le=100.0)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, values: Any) -> Any:
        if isinstance(values, dict):  # null means the default, as OpenAI's reference has it
            values = {k: v for k, v in values.items() if not (v is None and k in {"temperature", "top_p", "stream"})}
            items = values.get("input")
            if isinstance(items, list):
                values["input"] = [_input_item(i, item) for i, item in enumerate(items)]
        return values

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        if isinstance(self.input, str):
            _encodable(self.input, "input")
            if not self.input:
                raise ValueError("input: must not be empty")
        elif not self.input:
            raise ValueError("input: give at least one message")
        if self.instructions is not None:
            _encodable(self.instructions, "instructions")
        for text in [self.user, self.safety_identifier, self.prompt_cache_key, *(self.metadata or {}).items()]:
            if text is not None:  # echoed back in the response: it must encode
                _encodable(list(text) if isinstance(text, tuple) else text, "metadata" if isinstance(text, tuple) else "user")
        if self.text is not None and self.text.format is not None and self.text.format.type != "text":
            raise ValueError(f"text: only format type 'text' is supported (got {self.text.format.type!r})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        for item in self.include or []:
            if item != LOGPROBS_INCLUDE:
                raise ValueError(f"include: {item!r} is not supported (only {LOGPROBS_INCLUDE!r})")
        if self.top_logprobs and LOGPROBS_INCLUDE not in (self.include or []):
            raise ValueError(f"top_logprobs: requires include [{LOGPROBS_INCLUDE!r}]")
        refused = {
            "store": self.store is True,
            "background": self.background is True,
            "tools": bool(self.tools),
            "previous_response_id": self.previous_response_id is not None,
            "conversation": self.conversation is not None,
            "reasoning": self.reasoning is not None,
            "prompt": self.prompt is not None,
        }
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"{name}: not supported by the offset proxy (responses are not stored; no tools)")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (the proxy decodes it as one)."""
        messages = [] if self.instructions is None else [Message(role="system", content=self.instructions)]
        if isinstance(self.input, str):
            messages.append(Message(role="user", content=self.input))
        else:
            messages.extend(item.as_message() for item in self.input)
        logprobs = LOGPROBS_INCLUDE in (self.include or [])
        return ChatCompletionRequest(
            model=self.model,
            messages=messages,
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            logprobs=logprobs,
            top_logprobs=(self.top_logprobs or 0) if logprobs else None,
            offset_alpha=self.offset_alpha,
        )


# ------------------------------------------------------------------ shapes
def _logprob(t: TokenOut, *, with_bytes: bool) -> dict[str, Any]:
    """One ``logprobs`` entry: output text's carry ``bytes``, stream deltas do not."""
    entry: dict[str, Any] = {"token": t.token, "logprob": t.logprob}
    tops = []
    for tok, data, lp in t.top:
        top: dict[str, Any] = {"token": tok, "logprob": lp}
        if with_bytes:
            top["bytes"] = list(data) if data is not None else list(tok.encode("utf-8", "replace"))
        tops.append(top)
    if with_bytes:
        entry["bytes"] = list(t.data)
    entry["top_logprobs"] = tops
    return entry


class ResponseBuilder:
    """The ``response`` object of one job, built as its pieces arrive."""

    def __init__(self, job: Job, req: ResponsesRequest) -> None:
        self.job, self.req = job, req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = time.time()
        self.text = ""
        self.tokens: list[TokenOut] = []
        self.finish: str | None = None

    @property
    def refused(self) -> bool:
        return bool(self.job.stats and self.job.stats[0].refused)

    def part(self, done: bool) -> dict[str, Any]:
        if self.refused:
            return {"type": "refusal", "refusal": self.text if done else ""}
        part: dict[str, Any] = {"type": "output_text", "text": self.text if done else "", "annotations": []}
        if self.job.params.logprobs:
            part["logprobs"] = [_logprob(t, with_bytes=True) for t in self.tokens] if done else []
        return part

    def item(self, status: str) -> dict[str, Any]:
        content = [self.part(True)] if status != "in_progress" else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @property
    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def response(self, status: str, output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        stats: list[ChoiceStats] = self.job.stats
        prompt = next((s.prompt_tokens for s in stats if s.prompt_tokens is not None), 0) or 0
        completion = sum(s.completion_tokens for s in stats)
        done = status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.job.model.name,
            "output": output if output is not None else [],
            "parallel_tool_calls": True if self.req.parallel_tool_calls is None else self.req.parallel_tool_calls,
            "temperature": self.req.temperature,
            "top_p": self.req.top_p,
            "top_logprobs": self.req.top_logprobs,
            "tool_choice": self.req.tool_choice or "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": False,
            "background": False,
            "metadata": dict(self.req.metadata or {}),
            "user": self.req.user,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
            if done
            else None,
        }


async def respond(job: Job, req: ResponsesRequest) -> dict[str, Any]:
    """The whole ``response`` object of ``job`` (one choice).

    Raises:
        adapters.base.RemoteError, DecodingError: the choice failed.
    """
    built = ResponseBuilder(job, req)
    async with contextlib.aclosing(_pieces(job)) as pieces:
        async for piece in pieces:
            built.text += piece.text
            built.tokens.extend(piece.tokens)
            built.finish = piece.finish_reason or built.finish
    return built.response(built.status, [built.item(built.status)])


def _pieces(job: Job) -> AsyncGenerator[Piece, None]:
    job.stats = [ChoiceStats()]
    return job.model.generate(job.context, job.params, index=0, stats=job.stats[0])  # type: ignore[return-value]


async def respond_stream(job: Job, req: ResponsesRequest) -> AsyncGenerator[dict[str, Any], None]:
    """The typed stream events of ``job`` (one choice), in OpenAI's order: ``response.created``,
    ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
    ``response.output_text.delta`` per piece (``response.refusal.delta`` for a refusal),
    the ``.done`` events, then ``response.completed`` (``response.incomplete`` at
    ``max_output_tokens``). Nothing is yielded before the first piece is decoded, so that a
    request that fails at once is answered with an error status, not a broken stream.

    Raises:
        as :func:`respond`; the caller sends a failure after the first event as an ``error`` event.
    """
    built = ResponseBuilder(job, req)
    seq = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        return {"type": kind, "sequence_number": seq - 1, **fields}

    opened = False
    where = {"item_id": built.item_id, "output_index": 0, "content_index": 0}
    async with contextlib.aclosing(_pieces(job)) as pieces:
        async for piece in pieces:
            if not opened:
                opened = True
                yield event("response.created", response=built.response("in_progress"))
                yield event("response.in_progress", response=built.response("in_progress"))
                yield event("response.output_item.added", output_index=0, item=built.item("in_progress"))
                yield event("response.content_part.added", **where, part=built.part(False))
            built.tokens.extend(piece.tokens)
            if piece.text or piece.tokens:
                built.text += piece.text
                if built.refused:
                    yield event("response.refusal.delta", **where, delta=piece.text)
                else:
                    yield event(
                        "response.output_text.delta",
                        **where,
                        delta=piece.text,
                        logprobs=[_logprob(t, with_bytes=False) for t in piece.tokens] if job.params.logprobs else [],
                    )
            built.finish = piece.finish_reason or built.finish
    if not opened:  # an empty answer still gets its events
        yield event("response.created", response=built.response("in_progress"))
        yield event("response.in_progress", response=built.response("in_progress"))
        yield event("response.output_item.added", output_index=0, item=built.item("in_progress"))
        yield event("response.content_part.added", **where, part=built.part(False))
    part = built.part(True)
    if part["type"] == "refusal":
        yield event("response.refusal.done", **where, refusal=built.text)
    else:
        logprobs = [_logprob(t, with_bytes=False) for t in built.tokens] if job.params.logprobs else []
        yield event("response.output_text.done", **where, text=built.text, logprobs=logprobs)
    yield event("response.content_part.done", **where, part=part)
    status = built.status
    yield event("response.output_item.done", output_index=0, item=built.item(status))
    final = built.response(status, [built.item(status)])
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
