"""Remotes reached over HTTP with the official ``openai`` SDK (``AsyncOpenAI``).

Two adapters:

* :class:`ChatAdapter` - ``/v1/chat/completions``. Continuing a partial
  assistant message ("prefill") differs per server, so the adapter takes a
  *flavour*:

  ============  ===============================================================
  ``llama.cpp`` a trailing assistant message (llama.cpp's ``llama-server``)
  ``vllm``      ``continue_final_message: true`` + ``add_generation_prompt: false``
                (vLLM, SGLang)
  ``deepseek``  a trailing assistant message with ``prefix: true``
  ``none``      cannot continue (OpenAI's own chat models); token mode refused
  ============  ===============================================================

  llama-cpp-python's own server answers a trailing assistant message in a
  *new* turn, so it needs :class:`CompletionsAdapter` instead.

* :class:`CompletionsAdapter` - raw ``/v1/completions`` with the prompt
  rendered by the proxy from a configured chat template; continuing is just
  appending the accepted text.

Both ask for ``top_logprobs`` and switch the server's sampling filters off in
draft requests so that the reported logprobs are the sampling distribution;
on llama.cpp and vLLM, sampled drafts keep one filter, ``top_k`` equal to
``top_logprobs``, so that they are drawn from the reported candidates only
(:attr:`adapters.base.Capabilities.top_k_drafts`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import openai

from proxy.common.literals import Prefill, values

from .base import (
    Candidate,
    Capabilities,
    Context,
    Draft,
    Position,
    RemoteBadResponse,
    RemoteRejected,
    Sample,
    ScoredText,
    answer_token_bytes,
    candidate_from_wire,
    split_incomplete_utf8,
)
from .retry import DEFAULT_RETRY, RetryPolicy, call_with_retries
from .templates import ChatTemplate

log = logging.getLogger(__name__)

Flavour = Prefill
FLAVOURS: tuple[str, ...] = values(Prefill)

#: End-of-turn token strings as servers print them in ``top_logprobs``.
DEFAULT_EOT_TOKENS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<eos>", "<|end|>"}
)

#: Server-specific sampling switches that make the reported logprobs the
#: sampling distribution (top_k / min_p / penalties off).
SAMPLING_OFF: dict[str, dict[str, Any]] = {
    "llama.cpp": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
    "vllm": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
    "deepseek": {},
    "none": {},
}

#: Servers whose sampled drafts can be drawn from the top-k candidates alone (their
#: ``top_k`` filter, set to ``top_logprobs``; :attr:`Capabilities.top_k_drafts`).
TOP_K_DRAFTS = frozenset({"llama.cpp", "vllm"})


def heal(positions: Sequence[Position], pending: bytes) -> tuple[Position, ...]:
    """Condition a remote answer on ``pending`` bytes it could not be sent.

    A prefix that ends inside a UTF-8 character cannot be sent as text; the
    adapter sends the complete characters and the remote proposes the next
    token from there. Only candidates whose bytes start with ``pending`` are
    consistent with what was accepted: they are kept with ``pending`` stripped
    (their logprobs share one normaliser, which cancels in the decoder's
    softmax). Positions after the first are dropped unless the remote's own
    sampled token was consistent.
    """
    if not pending or not positions:
        return tuple(positions)
    first = positions[0]

    def strip(c: Candidate) -> Candidate | None:
        if c.data is None or c.is_eot or not c.data.startswith(pending):
            return None
        return Candidate(c.data[len(pending) :], c.logprob, c.token, c.token_id)

    kept = tuple(s for c in first.candidates if (s := strip(c)) is not None and s.data)
    if not kept:
        raise RemoteBadResponse(f"upstream offered no candidate that completes the partial character {pending!r}")
    sampled = strip(first.sampled)
    rest = tuple(positions[1:]) if sampled is not None and sampled.data else ()
    return (Position(kept, sampled if sampled is not None and sampled.data else kept[0]), *rest)


def strip_held_back(positions: Sequence[Position], prefix: bytes) -> tuple[Position, ...]:
    """Undo servers that print a token completing a multi-byte character with the
    character's *whole* bytes (vLLM's detokenizer holds the earlier partial bytes back and
    releases them with the last token): where the text so far ends inside a character,
    a candidate that starts with that character's bytes and with a lead byte (a real
    continuation starts with a continuation byte) has them removed. Without this, every
    candidate repeats bytes already accepted and none is representable (a 502)."""
    try:
        tail = split_incomplete_utf8(prefix)[1]
    except UnicodeDecodeError:
        return tuple(positions)
    out: list[Position] = []
    for i, pos in enumerate(positions):
        if tail:

            def fix(c: Candidate, tail: bytes = tail) -> Candidate:
                if c.data is None or len(c.data) <= len(tail) or not c.data.startswith(tail):
                    return c
                return Candidate(c.data[len(tail) :], c.logprob, c.token, c.token_id, c.is_eot)

            pos = Position(tuple(fix(c) for c in pos.candidates), fix(pos.sampled))
        out.append(pos)
        try:
            if pos.sampled.data is not None:
                tail = split_incomplete_utf8(tail + pos.sampled.data)[1]
                continue
        except UnicodeDecodeError:
            pass
        return (*out, *positions[i + 1 :])  # the text goes on from bytes nobody knows: the rest as sent
    return tuple(out)


def _finite(logprob: Any) -> float:
    value = -math.inf if logprob is None else float(logprob)
    return value if math.isfinite(value) and value > -9000.0 else -math.inf


def _position(entries: Sequence[Candidate], sampled: Candidate, top_k: int) -> Position:
    ranked = sorted(entries, key=lambda c: c.logprob, reverse=True)[:top_k]
    if not ranked:
        raise RemoteBadResponse("upstream returned no top_logprobs; it cannot serve token mode")
    return Position(tuple(ranked), sampled)


class _HTTPAdapter:
    """Client construction, retries and the EOT convention shared by both adapters."""

    capabilities: Capabilities

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None,
        eot_tokens: frozenset[str] = DEFAULT_EOT_TOKENS,
        sampling_off: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        http_client: Any = None,
        # ``http_client``: an ``openai.DefaultAsyncHttpxClient``; tests pass one with a mock transport.
    ) -> None:
        self.name = name
        self.model = model
        self.eot_tokens = eot_tokens
        self.sampling_off = dict(sampling_off or {})
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
        return candidate_from_wire(token, logprob, data, eot_tokens=self.eot_tokens)

    def _body(self, n_tokens: int, top_k: int, greedy: bool) -> dict[str, Any]:
        body = dict(self.extra_body)
        if n_tokens > 1:  # several positions: the sampled path must be the plain distribution's
            body.update(self.sampling_off)
            if not greedy and self.capabilities.top_k_drafts:
                body["top_k"] = top_k  # … restricted to the reported candidates
        return body

    async def _sample(self, call: Callable[[], Awaitable[Any]], text: Callable[[Any], str | None]) -> Sample:
        """Sequence mode's one complete answer: ``call`` (retried), then the first choice's
        ``text(choice)`` and finish reason ("length", else "stop") and the usage counts.

        Raises:
            RemoteUnavailable, RemoteRejected: as :func:`adapters.retry.call_with_retries`.
            RemoteBadResponse: no choice.
        """
        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        if not response.choices:
            raise RemoteBadResponse("upstream returned no choices")
        choice = response.choices[0]
        usage = response.usage
        return Sample(
            text(choice) or "",
            "length" if choice.finish_reason == "length" else "stop",
            usage.prompt_tokens if usage is not None else None,
            usage.completion_tokens if usage is not None else None,
        )

    async def _call(
        self, ctx: Context, text: str, max_tokens: int, top_k: int, seed: int | None, *, greedy: bool
    ) -> Draft:
        """One remote call continuing ``ctx`` after the assistant ``text`` (complete characters)."""
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
        character and the answer conditioned on the rest (:func:`heal`).
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
        ``return_token_ids``, one output token) in its body. The answer's positions are those
        after the prompt's ids, which must be a prefix of the whole text's ids.
        (vLLM's OpenAI-compatible server: ``SamplingParams.prompt_logprobs``; each position's
        entry holds the top-k and the prompt's own token, ``{id: {logprob, rank, decoded_token}}``.)
        """
        url = self._root + "/tokenize"

        async def tokenize() -> Any:
            return await self._client.post(url, cast_to=object, body={"model": self.model, **tokenize_body})

        head = await call_with_retries(tokenize, self.retry, f"model {self.name!r} /tokenize", secret=self._secret)
        extra = {"prompt_logprobs": top_k, "return_token_ids": True}

        async def call() -> Any:
            return await create(extra)

        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        dump = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        if dump.get("prompt_logprobs") is not None:  # chat: on the response
            where = dump
        elif dump.get("choices"):  # completions: on the choice
            where = dump["choices"][0]
        else:
            raise RemoteBadResponse(f"model {self.name!r}: upstream returned no choices")
        ids, entries = where.get("prompt_token_ids"), where.get("prompt_logprobs")
        prefix = head.get("tokens") if isinstance(head, dict) else None
        if not isinstance(ids, list) or not isinstance(entries, list) or not isinstance(prefix, list):
            raise RemoteBadResponse(
                f"model {self.name!r}: the upstream gave no prompt_logprobs / token ids (is it vLLM?)"
            )
        n = len(prefix)
        if ids[:n] != prefix or len(entries) != len(ids):
            raise RemoteBadResponse(
                f"model {self.name!r}: the answer's first token merges with the prompt's last; "
                "its positions cannot be told apart"
            )
        try:
            answer_ids = [int(t) for t in ids[n:]]
            rows = entries[n:]
            if any(not isinstance(r, dict) or str(t) not in r for t, r in zip(answer_ids, rows, strict=True)):
                raise RemoteBadResponse(f"model {self.name!r}: prompt_logprobs lack the answer's own tokens")
            strings = [str(r[str(t)].get("decoded_token") or "") for t, r in zip(answer_ids, rows, strict=True)]
            data = answer_token_bytes(strings, text.encode("utf-8"))
            positions: list[Position] = []
            for t, row, own in zip(answer_ids, rows, data, strict=True):
                cands = [
                    Candidate(c.data, c.logprob, c.token, int(key), c.is_eot)
                    for key, v in row.items()
                    if int(v.get("rank") or 10**9) <= top_k
                    for c in [self._wire(str(v.get("decoded_token") or ""), v.get("logprob"), None)]
                ]
                lp = row[str(t)].get("logprob")
                tok = strings[len(positions)]
                sampled = Candidate(own, _finite(lp), tok, t)
                positions.append(Position(tuple(sorted(cands, key=lambda c: c.logprob, reverse=True)), sampled))
            return ScoredText(tuple(answer_ids), tuple(positions), tuple(int(t) for t in prefix))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise RemoteBadResponse(f"model {self.name!r}: malformed prompt_logprobs: {exc}") from exc

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


class ChatAdapter(_HTTPAdapter):
    """An OpenAI-compatible ``/v1/chat/completions`` remote (see module docstring)."""

    def __init__(self, *, flavour: Flavour, **kwargs: Any) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown prefill flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")
        kwargs.setdefault("sampling_off", SAMPLING_OFF[flavour])
        super().__init__(**kwargs)
        self.flavour = flavour
        self.capabilities = Capabilities(
            can_continue=flavour != "none",
            prompt_logprobs=flavour == "vllm",
            top_k_drafts=flavour in TOP_K_DRAFTS,
            notes=() if flavour != "none" else ("cannot continue a partial assistant message",),
        )

    def _messages(self, ctx: Context, text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        assert ctx.messages is not None
        messages = [dict(m) for m in ctx.messages]
        extra: dict[str, Any] = {}
        if not text:
            return messages, extra
        if self.flavour == "none":
            raise RemoteRejected(
                f"model {self.name!r}: the upstream cannot continue a partial assistant message", status=400
            )
        if self.flavour == "deepseek":
            messages.append({"role": "assistant", "content": text, "prefix": True})
        else:
            messages.append({"role": "assistant", "content": text})
        if self.flavour == "vllm":
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        return messages, extra

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        """See :meth:`adapters.base.RemoteAdapter.draft` (and :meth:`_HTTPAdapter._healed_draft`)."""
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
        body = {**self._body(max_tokens, top_k, greedy), **extra}

        async def call() -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                logprobs=True,
                top_logprobs=top_k,
                temperature=0.0 if greedy else 1.0,
                top_p=1.0,
                seed=seed,
                extra_body=body or None,
            )

        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        if not response.choices:
            raise RemoteBadResponse("upstream returned no choices")
        choice = response.choices[0]
        content = (choice.logprobs.content if choice.logprobs is not None else None) or []
        positions: list[Position] = []
        for entry in content:
            sampled = self._wire(entry.token, entry.logprob, entry.bytes)
            tops = [self._wire(t.token, t.logprob, t.bytes) for t in entry.top_logprobs or []]
            positions.append(_position(tops, sampled, top_k))
        if not positions and choice.finish_reason == "stop":
            eot = self._eot()
            positions.append(Position((eot,), eot))  # the remote ended its turn at once
        if not positions:
            raise RemoteBadResponse("upstream returned no logprobs; it cannot serve token mode")
        usage = response.usage.prompt_tokens if response.usage is not None else None
        return Draft(tuple(positions), choice.finish_reason, usage)

    async def sample(
        self,
        ctx: Context,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Sample:
        """See :meth:`adapters.base.SamplingAdapter.sample`."""
        if ctx.messages is None:
            raise RemoteRejected(
                f"model {self.name!r} is served through a chat endpoint and takes messages only", status=400
            )

        messages = [dict(m) for m in ctx.messages]

        async def call() -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=list(stop) or None,
                seed=seed,
                extra_body=dict(self.extra_body) or None,
            )

        return await self._sample(call, lambda choice: choice.message.content)

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """See :meth:`adapters.base.TextScoringAdapter.score_text`; the ``vllm`` flavour only
        (the answer is the final assistant message, continued, as in :meth:`draft`).

        Raises:
            RemoteRejected: another flavour (400), or the upstream refused.
        """
        if self.flavour != "vllm" or ctx.messages is None:
            raise RemoteRejected(
                f'model {self.name!r}: scoring given text needs a vLLM chat upstream (prefill = "vllm")',
                status=400,
            )
        messages = [dict(m) for m in ctx.messages]

        async def create(extra: dict[str, Any]) -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                messages=[*messages, {"role": "assistant", "content": text}],  # type: ignore[list-item]
                max_tokens=1,
                temperature=0.0,
                extra_body={**self.extra_body, **extra, "continue_final_message": True, "add_generation_prompt": False},
            )

        return await self._prompt_logprobs({"messages": messages, "add_generation_prompt": True}, create, text, top_k)


class CompletionsAdapter(_HTTPAdapter):
    """A raw ``/v1/completions`` remote: the proxy renders the chat template
    itself and continues by appending the accepted text to the prompt."""

    def __init__(self, *, template: ChatTemplate | None, sampling: str = "llama.cpp", **kwargs: Any) -> None:
        kwargs.setdefault("sampling_off", SAMPLING_OFF.get(sampling, {}))
        super().__init__(**kwargs)
        self.template = template
        self.sampling = sampling
        self.capabilities = Capabilities(
            can_continue=True,
            raw_prompt=True,
            prompt_logprobs=sampling == "vllm",
            top_k_drafts=sampling in TOP_K_DRAFTS,
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
        """See :meth:`adapters.base.RemoteAdapter.draft` (and :meth:`_HTTPAdapter._healed_draft`)."""
        return await self._healed_draft(ctx, n_tokens, top_k, seed, greedy)

    async def sample(
        self,
        ctx: Context,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Sample:
        """See :meth:`adapters.base.SamplingAdapter.sample`."""
        prompt = self.render(ctx)

        async def call() -> Any:
            return await self._client.completions.create(
                model=self.model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=list(stop) or None,
                seed=seed,
                extra_body=dict(self.extra_body) or None,
            )

        return await self._sample(call, lambda choice: choice.text)

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """See :meth:`adapters.base.TextScoringAdapter.score_text`; ``sampling = "vllm"``
        only: the rendered prompt, then ``text``.

        Raises:
            RemoteRejected: another server (400), or the upstream refused.
        """
        if self.sampling != "vllm":
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
        prompt = self.render(ctx) + text
        body = self._body(max_tokens, top_k, greedy)

        async def call() -> Any:
            return await self._client.completions.create(
                model=self.model,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=top_k,
                temperature=0.0 if greedy else 1.0,
                top_p=1.0,
                seed=seed,
                extra_body=body or None,
            )

        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        if not response.choices:
            raise RemoteBadResponse("upstream returned no choices")
        choice = response.choices[0]
        lp = choice.logprobs
        positions: list[Position] = []
        if lp is not None and lp.tokens:
            tops_list = lp.top_logprobs or []
            for i, token in enumerate(lp.tokens):
                token_lp = lp.token_logprobs[i] if lp.token_logprobs and i < len(lp.token_logprobs) else None
                sampled = self._wire(token, token_lp, None)
                tops = tops_list[i] if i < len(tops_list) and tops_list[i] else {}
                entries = [self._wire(t, v, None) for t, v in tops.items()]
                positions.append(_position(entries, sampled, top_k))
        if not positions and choice.finish_reason == "stop":
            eot = self._eot()
            positions.append(Position((eot,), eot))
        if not positions:
            raise RemoteBadResponse("upstream returned no logprobs; it cannot serve token mode")
        usage = response.usage.prompt_tokens if response.usage is not None else None
        return Draft(tuple(positions), choice.finish_reason, usage)
