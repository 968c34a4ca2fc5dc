"""What the OpenAI-compatible HTTP adapters share (:class:`HTTPAdapter`): the official
``openai`` SDK's client (``AsyncOpenAI``), retries (:mod:`adapters.retry`), the
end-of-turn convention, token healing, and vLLM's ``POST /tokenize`` for scoring.

Both adapters (:mod:`adapters.openai_chat`, :mod:`adapters.openai_completions`) ask for
``top_logprobs`` and switch the server's sampling filters off in draft requests
(:attr:`adapters.profiles.ServerProfile.sampling_off`) so that the reported logprobs are
the sampling distribution; where the profile says so (llama.cpp, vLLM), sampled drafts
keep one filter, ``top_k`` equal to ``top_logprobs``, so that they are drawn from the
reported candidates only (:attr:`adapters.base.Capabilities.top_k_drafts`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import openai

from .base import (
    EOT_TOKENS,
    Candidate,
    Capabilities,
    Context,
    Draft,
    Position,
    RemoteBadResponse,
    RemoteError,
    Sample,
    ScoredText,
    split_incomplete_utf8,
)
from .draft_stream import StreamedDraft
from .profiles import ServerProfile
from .prompt_logprobs import scored_text
from .retry import DEFAULT_RETRY, RetryPolicy, call_with_retries
from .utf8 import heal, strip_held_back
from .wire import candidate_from_wire, wire_logprob

log = logging.getLogger(__name__)

#: Retries of a token count (:meth:`HTTPAdapter.count_tokens`): two attempts within 5 s.
COUNT_RETRY = RetryPolicy(attempts=2, total_seconds=5.0)


class HTTPAdapter:
    """Client construction, retries and the EOT convention shared by both adapters.

    ``profile`` is the server's (:mod:`adapters.profiles`); ``eot_tokens`` the token strings
    that end a turn as the server prints them (default :data:`adapters.base.EOT_TOKENS`).
    """

    capabilities: Capabilities

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None,
        profile: ServerProfile,
        eot_tokens: Iterable[str] = EOT_TOKENS,
        extra_body: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        http_client: Any = None,
        # ``http_client``: an ``openai.DefaultAsyncHttpxClient``; tests pass one with a mock transport.
    ) -> None:
        self.name = name
        self.model = model
        self.profile = profile
        self.eot_tokens = frozenset(eot_tokens)
        self.extra_body = dict(extra_body or {})
        self.retry = retry
        self._secret = api_key
        self._root = base_url.rstrip("/").removesuffix("/v1")
        """The server's root: vLLM serves ``/tokenize`` beside ``/v1``."""
        self.identity = f"{base_url.rstrip('/')}|{model}"
        """Which remote model answers (cache keys)."""
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "none",
            max_retries=0,  # tenacity owns retries (adapters.retry)
            timeout=openai.Timeout(read_timeout, connect=connect_timeout),
            http_client=http_client,
        )

    def _wire(self, token: str, logprob: float | None, data: list[int] | None) -> Candidate:
        if not self.profile.wire_bytes:
            data = None  # recovered from the token string, or unknown (adapters.wire)
        return candidate_from_wire(token, logprob, data, eot_tokens=self.eot_tokens)

    def _seed(self, seed: int | None) -> Any:
        """The ``seed`` argument of a request: ``seed``, or not sent at all where there is none
        or the server's field has another name (:meth:`_seed_body`) or it takes none."""
        return seed if seed is not None and self.profile.seed_field == "seed" else openai.omit

    def _seed_body(self, seed: int | None) -> dict[str, Any]:
        """Request body fields that carry ``seed`` where the server names its field otherwise
        (Mistral's ``random_seed``)."""
        field = self.profile.seed_field
        return {field: seed} if seed is not None and field not in (None, "seed") else {}

    def _body(self, n_tokens: int, top_k: int, greedy: bool, seed: int | None = None) -> dict[str, Any]:
        body = {**self.extra_body, **self._seed_body(seed)}
        if n_tokens > 1:  # several positions: the sampled path must be the plain distribution's
            body.update(self.profile.sampling_off)
            if not greedy and self.capabilities.top_k_drafts:
                body["top_k"] = top_k  # … restricted to the reported candidates
        return body

    async def _first_choice(self, call: Callable[[], Awaitable[Any]]) -> tuple[Any, Any]:
        """``call`` (retried) and its response's first choice.

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
            RemoteBadResponse: no choice.
        """
        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        if not response.choices:
            raise RemoteBadResponse("upstream returned no choices")
        return response, response.choices[0]

    async def _sample(
        self,
        call: Callable[[], Awaitable[Any]],
        text: Callable[[Any], str | None],
        logprob: Callable[[Any], float | None] | None = None,
    ) -> Sample:
        """Sequence mode's one complete answer: ``call`` (retried), then the first choice's
        ``text(choice)`` and finish reason ("length", else "stop"), the usage counts and, with
        ``logprob``, the answer's log-probability ``logprob(choice)``.

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
            RemoteBadResponse: no choice.
        """
        response, choice = await self._first_choice(call)
        usage = response.usage
        return Sample(
            text(choice) or "",
            "length" if choice.finish_reason == "length" else "stop",
            usage.prompt_tokens if usage is not None else None,
            usage.completion_tokens if usage is not None else None,
            logprob(choice) if logprob is not None else None,
        )

    async def _call(
        self, ctx: Context, text: str, max_tokens: int, top_k: int, seed: int | None, *, greedy: bool
    ) -> Draft:
        """One remote call continuing ``ctx`` after the assistant ``text`` (complete characters)."""
        raise NotImplementedError

    def _positions(self, logprobs: Any, top_k: int) -> list[Position]:
        """The positions of a choice's (or a stream chunk's) ``logprobs``, best ``top_k`` first."""
        raise NotImplementedError

    async def _healed_draft(self, ctx: Context, n_tokens: int, top_k: int, seed: int | None, greedy: bool) -> Draft:
        """A draft after ``ctx.assistant_prefix``, sent as text.

        Token healing: re-tokenising the accepted text can merge the last
        accepted token with the one before (``"\n"`` + ``"\n"`` → ``"\n\n"``),
        so the remote would continue from a token sequence it never produced.
        For one-token steps the adapter sends the text *without* the last
        accepted token and asks for two greedy tokens: when the remote's first
        one is exactly that token, the second position is conditioned on the
        remote's own tokenisation. Otherwise it falls back to the whole text.
        A prefix that ends inside a UTF-8 character is sent up to the
        character and the answer conditioned on the rest (:func:`adapters.utf8.heal`).
        """
        text, pending = split_incomplete_utf8(ctx.assistant_prefix)
        last = ctx.last_token
        calls = 1
        if n_tokens == 1 and not pending and last and ctx.assistant_prefix.endswith(last):
            head, head_pending = split_incomplete_utf8(ctx.assistant_prefix[: -len(last)])
            if not head_pending:
                healed = await self._call(ctx, head, 2, top_k, seed, greedy=True)
                if len(healed.positions) == 2 and healed.positions[0].sampled.data == last:
                    positions = strip_held_back(healed.positions[1:], ctx.assistant_prefix)
                    return Draft(positions, healed.finish_reason, healed.prompt_tokens)
                calls = 2  # the healed call was not usable: this step costs two
        draft = await self._call(
            ctx, text, n_tokens + (1 if pending else 0), top_k, seed, greedy=greedy or n_tokens == 1
        )
        positions = strip_held_back(heal(draft.positions, pending), ctx.assistant_prefix)
        return Draft(positions, draft.finish_reason, draft.prompt_tokens, calls)

    async def _prompt_logprobs(
        self,
        tokenize_body: dict[str, Any],
        create: Callable[[dict[str, Any]], Awaitable[Any]],
        text: str,
        top_k: int,
    ) -> ScoredText:
        """vLLM's teacher-forced scoring (``score_text``): ``POST /tokenize`` with
        ``tokenize_body`` gives the prompt's token ids without the answer; ``create(extra)``
        makes the completion request with the answer appended and ``extra`` (``prompt_logprobs``,
        ``return_token_ids``, one output token) in its body; :func:`adapters.prompt_logprobs.scored_text`
        reads the answer's positions from both.

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
            RemoteBadResponse: as :func:`adapters.prompt_logprobs.scored_text`.
        """
        url = self._root + "/tokenize"

        async def tokenize() -> Any:
            return await self._client.post(url, cast_to=object, body={"model": self.model, **tokenize_body})

        head = await call_with_retries(tokenize, self.retry, f"model {self.name!r} /tokenize", secret=self._secret)
        extra = {"prompt_logprobs": top_k, "return_token_ids": True}

        async def call() -> Any:
            return await create(extra)

        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        return scored_text(response, head, text, top_k, eot_tokens=self.eot_tokens, name=self.name)

    async def _open_stream(
        self,
        call: Callable[[], Awaitable[Any]],
        top_k: int,
        prefix: bytes,
        count_fields: dict[str, Any],
    ) -> StreamedDraft:
        """A streamed draft (:class:`adapters.draft_stream.StreamedDraft`): ``call`` opens the
        stream (``stream_options.include_usage`` asked), retried as a whole draft's call; each
        chunk's logprobs are read as a whole answer's (:meth:`_positions`); where the stream
        reports no usage, the prompt's tokens are counted with ``count_fields`` (:meth:`count_tokens`).

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
        """
        stream = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)

        def positions(chunk: Any) -> list[Position]:
            return self._positions(chunk.choices[0].logprobs, top_k) if chunk.choices else []

        def usage(chunk: Any) -> int | None:
            return chunk.usage.prompt_tokens if getattr(chunk, "usage", None) is not None else None

        async def count() -> int | None:
            return await self.count_tokens(count_fields)

        return StreamedDraft(
            stream,
            positions=positions,
            usage=usage,
            prefix=prefix,
            eot=self._eot(),
            what=f"model {self.name!r}",
            count=count,
        )

    async def count_tokens(self, fields: dict[str, Any]) -> int | None:
        """The server's count of a prompt's tokens (:attr:`adapters.profiles.ServerProfile.token_count`'s
        endpoint, ``fields`` the prompt's body fields), or None where the profile has no such
        endpoint or the server does not answer it within :data:`COUNT_RETRY` (logged): usage
        is not worth holding an answer back for long."""
        if self.profile.token_count is None:
            return None
        path = self.profile.token_count[0]

        async def call() -> Any:
            return await self._client.post(self._root + path, cast_to=object, body={"model": self.model, **fields})

        try:
            answer = await call_with_retries(call, COUNT_RETRY, f"model {self.name!r} {path}", secret=self._secret)
            return int(answer["count"])
        except (RemoteError, KeyError, TypeError, ValueError) as exc:
            log.warning("model %r: the prompt's tokens were not counted (%s); usage.prompt_tokens is 0", self.name, exc)
            return None

    def _eot(self) -> Candidate:
        return Candidate(b"", 0.0, next(iter(sorted(self.eot_tokens))), is_eot=True)

    async def check(self) -> None:
        """Readiness: one ``GET /models`` without retries (the caller bounds the time).

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
        """

        async def call() -> Any:  # a coroutine function: tenacity awaits only those
            return await self._client.models.list()

        await call_with_retries(
            call,
            RetryPolicy(attempts=1),
            f"model {self.name!r} readiness",
            secret=self._secret,
        )

    async def aclose(self) -> None:
        await self._client.close()


def sum_logprobs(values: Iterable[float | None]) -> float:
    """Σ of an answer's token logprobs as sent (nats; a missing or clamped one counts as
    ``-inf``: :func:`adapters.wire.wire_logprob`)."""
    return float(sum(wire_logprob(v) for v in values))
