"""A raw ``/v1/completions`` remote (:class:`CompletionsAdapter`): the prompt is rendered by
the proxy from a configured chat template (:mod:`adapters.templates`), and continuing is
just appending the accepted text. Its :class:`~adapters.profiles.ServerProfile` (the config's
``sampling``) says how to switch the server's sampling filters off and whether it scores
given text (vLLM).
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
from .profiles import LLAMA_CPP, ServerProfile
from .templates import ChatTemplate
from .wire import ranked_position


class CompletionsAdapter(HTTPAdapter):
    """A raw ``/v1/completions`` remote: the proxy renders the chat template
    itself and continues by appending the accepted text to the prompt."""

    def __init__(self, *, template: ChatTemplate | None, profile: ServerProfile = LLAMA_CPP, **kwargs: Any) -> None:
        super().__init__(profile=profile, **kwargs)
        self.template = template
        self.capabilities = Capabilities(
            can_continue=True,
            logprobs=profile.logprobs,
            max_top_logprobs=profile.max_top_logprobs,
            prompt_logprobs=profile.prompt_logprobs,
            top_k_drafts=profile.top_k_drafts,
            # where a stream closed early (at a replaced token) has its prompt's tokens counted
            streams_drafts=profile.logprobs and profile.token_count is not None,
        )

    def render(self, ctx: Context) -> str:
        """The prompt text for ``ctx`` without the accepted assistant text."""
        if ctx.prompt is not None:
            return ctx.prompt
        if self.template is None:
            raise RemoteRejected(
                f"model {self.name!r} has no chat template configured; use /v1/completions", status=400
            )
        assert ctx.messages is not None
        return self.template.render(ctx.messages)

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        """See :meth:`adapters.base.RemoteAdapter.draft` (and :meth:`adapters.http.HTTPAdapter._healed_draft`)."""
        return await self._healed_draft(ctx, n_tokens, top_k, seed, greedy)

    async def stream_draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> StreamedDraft | None:
        """See :meth:`adapters.streams.DraftStreamingAdapter.stream_draft`: the request of
        :meth:`draft` with ``stream`` on (:meth:`adapters.http.HTTPAdapter._open_stream`)."""
        text, pending = split_incomplete_utf8(ctx.assistant_prefix)
        if n_tokens < 2 or pending or not self.capabilities.streams_drafts:
            return None
        prompt = self.render(ctx) + text
        call = self._request(prompt, n_tokens, top_k, seed, greedy, stream=True)
        assert self.profile.token_count is not None  # streams_drafts
        return await self._open_stream(call, top_k, ctx.assistant_prefix, {self.profile.token_count[1]: prompt})

    def _request(
        self, prompt: str, max_tokens: int, top_k: int, seed: int | None, greedy: bool, *, stream: bool = False
    ) -> Callable[[], Awaitable[Any]]:
        """A draft's request on ``prompt``, as a call to retry; with ``stream``, the same request
        streamed with its usage at the end."""
        body = self._body(max_tokens, top_k, greedy, seed)
        streamed: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

        async def call() -> Any:
            return await self._client.completions.create(  # type: ignore[call-overload]
                model=self.model,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=top_k,
                temperature=0.0 if greedy else 1.0,
                top_p=1.0,
                seed=self._seed(seed),
                extra_body=body or None,
                **streamed,
            )

        return call

    def _positions(self, lp: Any, top_k: int) -> list[Position]:
        """The positions of a choice's (or a stream chunk's) ``logprobs``, best ``top_k`` first."""
        positions: list[Position] = []
        if lp is not None and lp.tokens:
            tops_list = lp.top_logprobs or []
            for i, token in enumerate(lp.tokens):
                token_lp = lp.token_logprobs[i] if lp.token_logprobs and i < len(lp.token_logprobs) else None
                sampled = self._wire(token, token_lp, None)
                tops = tops_list[i] if i < len(tops_list) and tops_list[i] else {}
                entries = [self._wire(t, v, None) for t, v in tops.items()]
                positions.append(ranked_position(entries, sampled, top_k))
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
        """See :meth:`adapters.base.SamplingAdapter.sample`; an assistant prefix is appended
        to the rendered prompt (complete characters)."""
        prefix, _ = split_incomplete_utf8(ctx.assistant_prefix)
        prompt = self.render(ctx) + prefix
        if logprobs and not self.capabilities.logprobs:
            raise RemoteRejected(f"model {self.name!r}: the upstream gives no logprobs", status=400)
        body = {**self.extra_body, **self._seed_body(seed)}

        async def call() -> Any:
            return await self._client.completions.create(
                model=self.model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=list(stop) or openai.omit,
                seed=self._seed(seed),
                logprobs=1 if logprobs else openai.omit,
                extra_body=body or None,
            )

        def logprob(choice: Any) -> float | None:
            lp = choice.logprobs
            return sum_logprobs(lp.token_logprobs) if lp is not None and lp.token_logprobs else None

        return await self._sample(call, lambda choice: choice.text, logprob if logprobs else None)

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """See :meth:`adapters.base.TextScoringAdapter.score_text`; ``sampling = "vllm"``
        only: the rendered prompt, then ``text``.

        Raises:
            RemoteRejected: another server (400), or the upstream refused.
        """
        if not self.profile.prompt_logprobs:
            raise RemoteRejected(
                f'model {self.name!r}: scoring given text needs a vLLM upstream (sampling = "vllm")', status=400
            )
        prompt = self.render(ctx)

        async def create(extra: dict[str, Any]) -> Any:
            return await self._client.completions.create(
                model=self.model,
                prompt=prompt + text,
                max_tokens=1,
                temperature=0.0,
                extra_body={**self.extra_body, **extra},
            )

        return await self._prompt_logprobs({"prompt": prompt}, create, text, top_k)

    async def _call(
        self, ctx: Context, text: str, max_tokens: int, top_k: int, seed: int | None, *, greedy: bool
    ) -> Draft:
        """One ``/v1/completions`` call on the rendered prompt followed by ``text``; ``greedy``: the
        sampled tokens are the remote's argmax (single steps, where only the candidate lists
        matter, and greedy drafts)."""
        call = self._request(self.render(ctx) + text, max_tokens, top_k, seed, greedy)

        response, choice = await self._first_choice(call)
        positions = self._positions(choice.logprobs, top_k)
        if not positions and choice.finish_reason == "stop":
            eot = self._eot()
            positions.append(Position((eot,), eot))
        if not positions:
            raise RemoteBadResponse("upstream returned no logprobs; it cannot serve token mode")
        usage = response.usage.prompt_tokens if response.usage is not None else None
        return Draft(tuple(positions), choice.finish_reason, usage)
