"""OpenAI's Responses API as a remote (:class:`ResponsesAdapter`): ``POST /v1/responses``.

Source: the OpenAI API reference for ``POST /v1/responses`` and the openai SDK's types. The
Responses API cannot continue a partial answer, has no ``n``, no ``seed`` and no stop strings:
the adapter serves sequence mode only (:meth:`sample`, one call per sample, made concurrently
by the decoder; stop strings are cut by the proxy). Where asked, an answer's log-probability
is the sum of its output text's token logprobs (``include:
["message.output_text.logprobs"]``). Chat messages become input items (system messages as
``developer`` ones, as OpenAI maps them).
"""

from __future__ import annotations

from typing import Any

import openai

from .base import Capabilities, Context, Draft, RemoteBadResponse, RemoteRejected, Sample
from .http import HTTPAdapter, sum_logprobs
from .retry import call_with_retries

#: The smallest ``max_output_tokens`` OpenAI's Responses API accepts.
MIN_OUTPUT_TOKENS = 16


class ResponsesAdapter(HTTPAdapter):
    """A ``/v1/responses`` remote (see module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capabilities = Capabilities(
            can_continue=False, logprobs=self.profile.logprobs, max_top_logprobs=self.profile.max_top_logprobs
        )

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        """Not available: the Responses API cannot continue a partial answer (sequence mode only).

        Raises:
            RemoteRejected: always (400).
        """
        raise RemoteRejected(
            f"model {self.name!r}: OpenAI's Responses API cannot continue a partial answer; "
            'serve it with decoding = "sequence"',
            status=400,
        )

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
        """See :meth:`adapters.base.SamplingAdapter.sample`. ``max_tokens`` below the API's
        minimum (16) is asked as 16 and the answer cut at ``max_tokens`` of the remote's tokens
        (from its output text's logprobs; refused where the model gives none); ``stop`` and
        ``seed`` are not sent (the API has neither; the decoder cuts stop strings).

        Raises:
            RemoteRejected: a context with an assistant prefix, or the upstream refused.
            RemoteUnavailable: as :func:`adapters.retry.call_with_retries`.
            RemoteBadResponse: no message in the output.
        """
        if ctx.assistant_prefix:
            raise RemoteRejected(
                f"model {self.name!r}: OpenAI's Responses API cannot continue a partial answer", status=400
            )
        if ctx.messages is None:
            raise RemoteRejected(
                f"model {self.name!r} is served through OpenAI's Responses API and takes messages only", status=400
            )
        items: Any = [
            {"role": "developer" if m["role"] == "system" else m["role"], "content": m["content"]}
            for m in ctx.messages
        ]
        # Below the API's minimum, the answer is cut here at max_tokens of the remote's own tokens,
        # which the output text's logprobs give.
        cut = max_tokens < MIN_OUTPUT_TOKENS
        if cut and not self.capabilities.logprobs:
            raise RemoteRejected(
                f"model {self.name!r}: OpenAI's Responses API answers at least {MIN_OUTPUT_TOKENS} tokens, and "
                f"without logprobs the proxy cannot cut the answer at {max_tokens}",
                status=400,
            )
        want_logprobs = logprobs or cut

        async def call() -> Any:
            return await self._client.responses.create(
                model=self.model,
                input=items,
                max_output_tokens=max(max_tokens, MIN_OUTPUT_TOKENS),
                temperature=temperature,
                top_p=top_p,
                include=["message.output_text.logprobs"] if want_logprobs else openai.omit,
                store=False,
                extra_body=dict(self.extra_body) or None,
            )

        response = await call_with_retries(call, self.retry, f"model {self.name!r}", secret=self._secret)
        parts = [
            p for item in response.output or [] if getattr(item, "type", None) == "message" for p in item.content or []
        ]
        if not parts:
            raise RemoteBadResponse("upstream returned no message in its output")
        text = "".join(getattr(p, "text", None) or getattr(p, "refusal", None) or "" for p in parts)
        entries = [e for p in parts for e in (getattr(p, "logprobs", None) or [])]
        incomplete = response.status == "incomplete"
        usage = response.usage
        completion = usage.output_tokens if usage is not None else None
        if cut and len(entries) > max_tokens:
            entries = entries[:max_tokens]
            data = b"".join(bytes(e.bytes) if e.bytes is not None else e.token.encode() for e in entries)
            text, incomplete, completion = data.decode("utf-8", "ignore"), True, max_tokens
        return Sample(
            text,
            "length" if incomplete else "stop",
            usage.input_tokens if usage is not None else None,
            completion,
            sum_logprobs([e.logprob for e in entries]) if logprobs and entries else None,
        )
