"""An OpenAI-compatible ``/v1/chat/completions`` remote (:class:`ChatAdapter`).

Continuing a partial assistant message ("prefill") differs per server: the adapter
takes the server's :class:`~adapters.profiles.ServerProfile` (``llama.cpp``, ``vllm``,
``deepseek``, or ``none``: it cannot continue, and token mode is refused).
llama-cpp-python's own server answers a trailing assistant message in a *new* turn, so
it needs :class:`adapters.openai_completions.CompletionsAdapter` instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai

from .base import (
    Capabilities,
    Context,
    Draft,
    Position,
    RemoteBadResponse,
    RemoteRejected,
    Sample,
    ScoredText,
    split_incomplete_utf8,
)
from .draft_stream import StreamedDraft
from .http import HTTPAdapter, sum_logprobs
from .profiles import ServerProfile
from .wire import ranked_position


class ChatAdapter(HTTPAdapter):
    """An OpenAI-compatible ``/v1/chat/completions`` remote (see module docstring)."""

    def __init__(self, *, profile: ServerProfile, **kwargs: Any) -> None:
        super().__init__(profile=profile, **kwargs)
        self.capabilities = Capabilities(
            can_continue=profile.prefill is not None,
            logprobs=profile.logprobs,
            max_top_logprobs=profile.max_top_logprobs,
            prompt_logprobs=profile.prompt_logprobs,
            top_k_drafts=profile.top_k_drafts,
            streams_drafts=(
                profile.logprobs
                and profile.prefill is not None
                and profile.token_count is not None
                and profile.tokenize_chat
            ),
        )

    def _messages(self, ctx: Context, text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        assert ctx.messages is not None
        messages = [dict(m) for m in ctx.messages]
        if not text:
            return messages, {}
        prefill = self.profile.prefill
        if prefill is None:
            raise RemoteRejected(
                f"model {self.name!r}: the upstream cannot continue a partial assistant message", status=400
            )
        messages.append({"role": "assistant", "content": text, **prefill.message})
        return messages, dict(prefill.body)

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        """See :meth:`adapters.base.RemoteAdapter.draft` (and :meth:`adapters.http.HTTPAdapter._healed_draft`)."""
        if ctx.messages is None:
            raise RemoteRejected(
                f"model {self.name!r} is served through a chat endpoint and takes messages only", status=400
            )
        return await self._healed_draft(ctx, n_tokens, top_k, seed, greedy)

    async def _call(
        self, ctx: Context, text: str, max_tokens: int, top_k: int, seed: int | None, *, greedy: bool
    ) -> Draft:
        """One ``/v1/chat/completions`` call continuing the assistant ``text``."""
        messages, extra = self._messages(ctx, text)
        call = self._request(messages, extra, max_tokens, top_k, seed, greedy)
        response, choice = await self._first_choice(call)
        positions = self._positions(choice.logprobs, top_k)
        if not positions and choice.finish_reason == "stop":
            eot = self._eot()
            positions.append(Position((eot,), eot))  # the remote ended its turn at once
        if not positions:
            raise RemoteBadResponse("upstream returned no logprobs; it cannot serve token mode")
        usage = response.usage.prompt_tokens if response.usage is not None else None
        return Draft(tuple(positions), choice.finish_reason, usage)

    async def stream_draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> StreamedDraft | None:
        """See :meth:`adapters.streams.DraftStreamingAdapter.stream_draft`: the request of
        :meth:`draft` with ``stream`` on (:meth:`adapters.http.HTTPAdapter._open_stream`; the
        prompt counted as the chat it is, with the prefill's fields, where the stream reports
        no usage)."""
        text, pending = split_incomplete_utf8(ctx.assistant_prefix)
        if n_tokens < 2 or pending or ctx.messages is None or not self.capabilities.streams_drafts:
            return None
        messages, extra = self._messages(ctx, text)
        call = self._request(messages, extra, n_tokens, top_k, seed, greedy, stream=True)
        return await self._open_stream(call, top_k, ctx.assistant_prefix, {"messages": messages, **extra})

    def _request(
        self,
        messages: list[dict[str, Any]],
        extra: dict[str, Any],
        max_tokens: int,
        top_k: int,
        seed: int | None,
        greedy: bool,
        *,
        stream: bool = False,
    ) -> Callable[[], Awaitable[Any]]:
        """A draft's request (``extra``: the prefill's body fields), as a call to retry; with
        ``stream``, the same request streamed with its usage at the end."""
        body = {**self._body(max_tokens, top_k, greedy, seed), **extra}
        streamed: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

        async def call() -> Any:
            return await self._client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                logprobs=True,
                top_logprobs=top_k,
                temperature=0.0 if greedy else 1.0,
                top_p=1.0,
                seed=self._seed(seed),
                extra_body=body or None,
                **streamed,
            )

        return call

    def _positions(self, logprobs: Any, top_k: int) -> list[Position]:
        """The positions of a choice's (or a stream chunk's) ``logprobs.content``, best ``top_k`` first."""
        positions: list[Position] = []
        for entry in (logprobs.content if logprobs is not None else None) or []:
            sampled = self._wire(entry.token, entry.logprob, entry.bytes)
            tops = [self._wire(t.token, t.logprob, t.bytes) for t in entry.top_logprobs or []]
            positions.append(ranked_position(tops, sampled, top_k))
        return positions

    async def sample(
        self,
        ctx: Context,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        logprobs: bool = False,
    ) -> Sample:
        """See :meth:`adapters.base.SamplingAdapter.sample`; a context with an assistant
        prefix is continued the profile's way (:attr:`adapters.profiles.ServerProfile.prefill`)."""
        if ctx.messages is None:
            raise RemoteRejected(
                f"model {self.name!r} is served through a chat endpoint and takes messages only", status=400
            )
        prefix, _ = split_incomplete_utf8(ctx.assistant_prefix)
        messages, extra = self._messages(ctx, prefix)
        body = {**self.extra_body, **self._seed_body(seed), **extra}
        if logprobs and not self.capabilities.logprobs:
            raise RemoteRejected(f"model {self.name!r}: the upstream gives no logprobs", status=400)

        async def call() -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=list(stop) or openai.omit,
                seed=self._seed(seed),
                logprobs=True if logprobs else openai.omit,
                extra_body=body or None,
            )

        def logprob(choice: Any) -> float | None:
            content = choice.logprobs.content if choice.logprobs is not None else None
            return sum_logprobs([e.logprob for e in content]) if content else None

        return await self._sample(call, lambda choice: choice.message.content, logprob if logprobs else None)

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """See :meth:`adapters.base.TextScoringAdapter.score_text`; the ``vllm`` profile only
        (the answer is the final assistant message, continued, as in :meth:`draft`).

        Raises:
            RemoteRejected: another profile (400), or the upstream refused.
        """
        prefill = self.profile.prefill
        if not self.profile.prompt_logprobs or prefill is None or ctx.messages is None:
            raise RemoteRejected(
                f'model {self.name!r}: scoring given text needs a vLLM chat upstream (prefill = "vllm")',
                status=400,
            )
        messages = [dict(m) for m in ctx.messages]

        async def create(extra: dict[str, Any]) -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                messages=[*messages, {"role": "assistant", "content": text, **prefill.message}],  # type: ignore[list-item]
                max_tokens=1,
                temperature=0.0,
                extra_body={**self.extra_body, **extra, **prefill.body},
            )

        return await self._prompt_logprobs({"messages": messages, "add_generation_prompt": True}, create, text, top_k)
