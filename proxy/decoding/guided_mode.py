"""Guided mode: offset decoding for a remote that continues a partial answer but gives no
logprobs (Groq, Mistral, Anthropic's older models, OpenRouter and Gemini without logprobs).

The remote drafts text (one call, no logprobs); the pair scores the draft teacher-forced in
its own tokens. Out of forget scope the remote's text passes unchanged. At the first token in
scope (rules ``token`` and ``choice``: its Δ ≤ −τ; rule ``step``: the step's s_t ≤ −τ with
B's distribution standing in for the remote's; every token without τ) the token is accepted or replaced as in
speculative decoding (:func:`proxy.decoding.speculative.speculative_pick`) with **B standing
in for the remote**: the target is q ∝ exp(ℓ_B/T + α·Δ) over B's top-k candidates and the
drafted token (:func:`proxy.decoding.offset.target_logits`), the draft law B's tempered
distribution; T = 0 takes q's argmax. Under ``choice`` at T = 0 the drafted token is the
remote's own choice, lowered by τ where it is in scope, so q takes the whole offset there; at
T > 0 B's most likely candidate stands in for the remote's choice. After a replacement the
rest of the draft is dropped and the remote continues from the new text (prefill).

Where this departs from token mode: in scope, ℓ_R is replaced by ℓ_B (the remote's logprobs
are not given), so in-scope tokens follow the pair's U/B rather than the remote's own
distribution shifted by Δ. A token whose bytes end inside a UTF-8 character is never a
replacement, and a position after such a token is never replaced (the remote continues
text in whole characters).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncGenerator

import numpy as np

from adapters.base import Context, SamplingAdapter
from proxy.decoding.offset import NoUsableCandidates, log_softmax, target_logits
from proxy.decoding.protocols import Served
from proxy.decoding.speculative import speculative_pick
from proxy.decoding.text import TextReleaser, cut_at_stop, inside_character
from proxy.decoding.types import (
    AnswerScores,
    ChoiceStats,
    DecodingError,
    Piece,
    SamplingParams,
    TokenOut,
    display_token,
)


class GuidedDecoder:
    """Guided mode for one served model (module docstring)."""

    def __init__(self, model: Served) -> None:
        self.model = model

    async def generate(
        self, base: Context, params: SamplingParams, rng: np.random.Generator, stats: ChoiceStats
    ) -> AsyncGenerator[Piece, None]:
        """Decode one choice; yields :class:`Piece` objects, the last with a finish reason.

        Raises:
            adapters.base.RemoteError: the remote failed after retries.
            DecodingError: the pair cannot take this prompt.
        """
        sampler = self.model.adapter
        assert isinstance(sampler, SamplingAdapter)  # checked in ServedModel.__post_init__
        pair = self.model.pair if self.model.uses_offset and params.alpha != 0 else None
        releaser = TextReleaser(params.stop)
        prefix = base.assistant_prefix
        ids: list[int] = []
        if pair is not None:
            try:
                prompt_ids = await self.model.run_pair(pair.prompt_ids, base.messages, base.prompt, stats=stats)
                if prefix:
                    head, _ = await self.model.run_pair(pair.encode_answer, prefix.decode("utf-8", "replace"))
                    prompt_ids = [*prompt_ids, *head]
            except ValueError as exc:
                raise DecodingError(str(exc)) from exc
        while stats.completion_tokens < params.max_tokens:
            left = params.max_tokens - stats.completion_tokens
            ctx = dataclasses.replace(base, assistant_prefix=prefix, token_ids=None, last_token=b"")
            sample = await sampler.sample(
                ctx,
                max_tokens=min(left, self.model.max_draft_tokens) if pair is not None else left,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop,
                seed=None if params.seed is None else int(rng.integers(2**31)),
            )
            stats.remote_calls += 1
            if stats.prompt_tokens is None:
                stats.prompt_tokens = sample.prompt_tokens
            sample = cut_at_stop(sample, params.stop)
            if pair is None:  # Δ ≡ 0: the remote's text as it is
                stats.completion_tokens += sample.completion_tokens or 0
                yield Piece(sample.text, [], sample.finish_reason)
                return
            draft, _ = await self.model.run_pair(pair.encode_answer, sample.text, stats=stats)
            ended = sample.finish_reason == "stop"
            if ended and not params.stop:
                draft.append(pair.vocab.eot_ids[0])  # the end of the turn is a token the offset may weigh
            truncated = len(draft) > left
            draft = draft[:left]
            stats.draft_tokens += len(draft)
            if not draft:
                yield releaser.finish("stop" if ended else "length")
                return
            try:
                sc = await self.model.run_pair(
                    pair.answer_scores, [*prompt_ids, *ids], draft, self.model.top_k, stats=stats
                )
            except ValueError as exc:
                if stats.completion_tokens == 0:
                    raise DecodingError(str(exc)) from exc
                yield releaser.finish("length")  # the pair's context is full
                return
            replaced = False
            for t, token in enumerate(draft):
                chosen, changed, logprob = token, False, math.nan
                if self._in_scope(sc, t, params) and not inside_character(prefix):
                    chosen, logprob = self._pick(sc, t, token, params, rng, prefix)
                    changed = chosen != token
                stats.completion_tokens += 1
                stats.accepted_tokens += int(not changed)
                if changed:
                    stats.offset_changed += 1
                stats.max_abs_delta = max(stats.max_abs_delta, abs(float(sc.delta[t])))
                if chosen in pair.vocab.eot_ids:
                    yield releaser.finish("stop")
                    return
                data = pair.vocab.token_bytes[chosen] or b""
                prefix += data
                ids.append(chosen)
                piece = releaser.push(TokenOut(data, display_token(data), logprob, (), changed))
                yield piece
                if piece.finish_reason is not None:
                    return
                if changed:
                    replaced = True
                    break
            if not replaced and ended and not truncated:
                yield releaser.finish("stop")  # the remote stopped at a stop string (the end of turn returned above)
                return
        yield releaser.finish("length")

    @staticmethod
    def _in_scope(sc: AnswerScores, t: int, params: SamplingParams) -> bool:
        """Whether the offset bites at position ``t`` of the draft (module docstring)."""
        tau = params.offset_threshold
        if tau is None:
            return True
        # token and choice: the drafted token's own offset (choice reaches further only in q)
        value = sc.step_offset[t] if params.offset_scope == "step" else sc.delta[t]
        return bool(value <= -tau)

    def _pick(
        self, sc: AnswerScores, t: int, token: int, params: SamplingParams, rng: np.random.Generator, prefix: bytes
    ) -> tuple[int, float]:
        """The token at an in-scope position: the drafted ``token`` accepted, or a replacement
        drawn from B's candidates (module docstring); and its log q."""
        assert self.model.pair is not None
        vocab = self.model.pair.vocab
        cands = [int(x) for x in sc.top_ids[t]]
        ell = [float(x) for x in sc.top_log_b[t]]
        delta = [float(x) for x in sc.top_delta[t]]
        if token not in cands:
            cands.append(token)
            ell.append(float(sc.log_b[t]))
            delta.append(float(sc.delta[t]))
        ell_arr = np.array(ell)
        for i, c in enumerate(cands):  # special tokens other than the end of turn, and partial characters
            data = vocab.token_bytes[c]
            if c != token and (
                (data is None and c not in vocab.eot_ids) or (data is not None and inside_character(prefix + data))
            ):
                ell_arr[i] = -np.inf
        drafted = cands.index(token)
        threshold = params.offset_threshold
        if params.offset_scope == "choice" and params.temperature == 0:
            threshold = None  # the drafted token is the remote's choice, lowered by τ: the whole offset
        scores = target_logits(
            ell_arr,
            np.array(delta),
            temperature=params.temperature,
            alpha=params.alpha,
            threshold=threshold,
            scope=params.offset_scope,
        )
        law = ell_arr if params.temperature == 0 else ell_arr / params.temperature
        try:
            law = log_softmax(law)
            idx, logq, _ = speculative_pick(
                scores, law, drafted, temperature=params.temperature, top_p=params.top_p, rng=rng
            )
        except NoUsableCandidates:
            return token, math.nan  # nothing to replace it with: the remote's token stays
        return cands[idx], float(logq[idx])
