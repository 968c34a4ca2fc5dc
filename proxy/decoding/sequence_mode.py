"""Sequence mode: complete samples from the remote, re-ranked by the offset (for remotes that
cannot continue a partial answer; arXiv 2404.11045, Eq. 3 at the sequence level).

Each sample y is scored by the pair, teacher-forced over its local tokens: Δ_t of each token
and, under a scope threshold τ, whether the token is in forget scope (rule ``token``: its own
Δ_t ≤ −τ; rule ``step``: the step's s_t ≤ −τ, B's distribution standing in for the remote's).
Its scoped offset is ΣΔ_scoped(y) = Σ_t Δ_t·[t in scope] (ΣΔ without τ): the sequence-level
product of the per-token factors of :func:`proxy.decoding.offset.target_logits`. Rule
``choice`` is scored as ``token`` here: it differs only at steps where the remote's own
choice is lowered by τ, and a complete sample does not say what the remote's choice was at
each of its positions, so a sample's token with −τ < Δ_t there keeps its remote weight.

- T > 0: one sample drawn with weight exp(α·ΣΔ_scoped) (:func:`sequence_weights`: importance
  resampling toward p(y)·exp(α·ΣΔ_scoped(y))), among the samples with no token in scope
  where there are any.
- T = 0: the remote's greedy answer when no token of it is in scope (one call, the remote's
  own answer). Otherwise ``sequence_samples − 1`` more are drawn at T = 1 and the answer is
  the one maximising Σℓ + α·ΣΔ_scoped among those out of scope, Σℓ the remote's own sequence
  log-probability where it gives logprobs, else B's (teacher-forced) standing in. Those draws
  carry seeds derived from the request's messages or prompt where the request gives none
  (:func:`prompt_seed`), so that the same greedy request gets the same answer (streamed or
  not) from a remote that honours ``seed``.
- Every candidate in scope: the model's ``scope_action`` ("refuse": its refusal text;
  "mask": the best candidate with its in-scope spans masked, :mod:`proxy.decoding.spans`;
  "rewrite": the best candidate up to its first in-scope word, the rest written by the pair
  under the offset). Never the forget content itself.

Departure from the paper's rule: the paper resamples every sample by exp(α·ΣΔ); here a sample
in scope is never returned while one out of scope is, and without τ (``offset_threshold =
"off"``) nothing is in scope and the weights are exp(α·ΣΔ) as in the paper.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from adapters.base import Context, Sample, SamplingAdapter, split_incomplete_utf8
from proxy.decoding.offset import NoUsableCandidates, choose, target_logits
from proxy.decoding.protocols import Served
from proxy.decoding.spans import flagged_spans, mask
from proxy.decoding.text import cut_at_stop
from proxy.decoding.types import ChoiceStats, DecodingError, Piece, SamplingParams


def prompt_seed(base: Context) -> int:
    """A seed that is a function of the request's messages or raw prompt (sha256 of their
    JSON): the same greedy request draws the same candidates."""
    text = json.dumps([base.messages, base.prompt], sort_keys=True, ensure_ascii=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "big")


@dataclass(frozen=True, slots=True)
class ScoredSample:
    """One sample as sequence mode ranks it."""

    sample: Sample
    offset: float
    """ΣΔ_scoped (nats; ΣΔ without τ)."""
    logprob: float
    """Σℓ: the remote's log-probability of the text where it gives logprobs, else B's (nats)."""
    in_scope: bool
    """Whether any token is in forget scope."""
    spans: np.ndarray
    """``[n, 2]`` character spans of its local tokens (the end-of-turn token's is empty)."""
    delta: np.ndarray
    """``[n]`` Δ of its local tokens."""
    flagged: np.ndarray
    """``[n]`` bool, the tokens in scope."""
    tokens: int


class SequenceDecoder:
    """Sequence mode for one served model (its settings are the model's)."""

    def __init__(self, model: Served) -> None:
        self.model = model

    async def generate(
        self, base: Context, params: SamplingParams, rng: np.random.Generator, stats: ChoiceStats
    ) -> Piece:
        """One answer (module docstring).

        Raises:
            adapters.base.RemoteError: a sample failed after retries.
            DecodingError: the pair cannot take this prompt, or the context has an assistant prefix.
        """
        assert isinstance(self.model.adapter, SamplingAdapter)  # checked in ServedModel.__post_init__
        if base.assistant_prefix:
            raise DecodingError(
                f"model {self.model.name!r} is served in sequence mode, which cannot continue a partial answer "
                "(redaction's regenerate mode and the audit's extraction prompts need token mode)"
            )
        scoring = self.model.uses_offset and params.alpha != 0
        greedy = params.temperature == 0
        n = self.model.sequence_samples
        if greedy:
            first = await self._samples(base, params, rng, stats, 1, 0.0)
            if not scoring:
                return self._answer(first[0], stats)
            prompt_ids = await self._prompt_ids(base, stats)
            scored = [await self._score(prompt_ids, first[0], params, stats)]
            if not scored[0].in_scope or n == 1:
                return await self._pick(scored, 0, params, stats, prompt_ids, rng)
            if params.seed is None:  # T = 0 is repeatable: the draws' seeds come from the request
                more = await self._samples(
                    base, params, np.random.default_rng(prompt_seed(base)), stats, n - 1, 1.0, True
                )
            else:
                more = await self._samples(base, params, rng, stats, n - 1, 1.0)
            scored += [await self._score(prompt_ids, x, params, stats) for x in more]
            value = np.array([x.logprob + params.alpha * x.offset for x in scored])
            out = np.array([not x.in_scope for x in scored])
            pool = np.flatnonzero(out) if out.any() else np.arange(len(scored))
            return await self._pick(scored, int(pool[np.argmax(value[pool])]), params, stats, prompt_ids, rng)
        samples = await self._samples(base, params, rng, stats, n, params.temperature)
        if not scoring:
            return self._answer(samples[0], stats)
        prompt_ids = await self._prompt_ids(base, stats)
        scored = [await self._score(prompt_ids, x, params, stats) for x in samples]
        weights = sequence_weights(np.array([x.offset for x in scored]), params.alpha)
        out = np.array([not x.in_scope for x in scored])
        if out.any():  # a sample in scope is never picked while one is out of it
            weights = np.where(out, weights, 0.0)
            weights = weights / weights.sum() if weights.sum() > 0 else out / out.sum()
        stats.sequence_weights = [float(w) for w in weights]
        return await self._pick(scored, int(rng.choice(len(scored), p=weights)), params, stats, prompt_ids, rng)

    async def _samples(
        self,
        base: Context,
        params: SamplingParams,
        rng: np.random.Generator,
        stats: ChoiceStats,
        n: int,
        temperature: float,
        seeded: bool = False,
    ) -> list[Sample]:
        """``n`` complete answers at ``temperature``, drawn concurrently (stop strings cut here,
        also where the upstream ignores them); each with a seed from ``rng`` where the request
        gives one, or with ``seeded``."""
        sampler = self.model.adapter
        assert isinstance(sampler, SamplingAdapter)
        want_logprobs = self.model.adapter.capabilities.logprobs and self.model.uses_offset and params.alpha != 0
        seeds = [int(rng.integers(2**31)) if seeded or params.seed is not None else None for _ in range(n)]
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other samples
                tasks = [
                    group.create_task(
                        sampler.sample(
                            base,
                            max_tokens=params.max_tokens,
                            temperature=temperature,
                            top_p=params.top_p if temperature == params.temperature else 1.0,
                            stop=params.stop,
                            seed=seed,
                            logprobs=want_logprobs,
                        )
                    )
                    for seed in seeds
                ]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure, as one remote call's error
        stats.remote_calls += n
        samples = [cut_at_stop(t.result(), params.stop) for t in tasks]
        stats.sample_texts = [*(stats.sample_texts or []), *(x.text for x in samples)]
        if stats.prompt_tokens is None:
            stats.prompt_tokens = next((x.prompt_tokens for x in samples if x.prompt_tokens is not None), None)
        return samples

    async def _prompt_ids(self, base: Context, stats: ChoiceStats) -> list[int]:
        pair = self.model.pair
        assert pair is not None
        try:
            return await self.model.run_pair(pair.prompt_ids, base.messages, base.prompt, stats=stats)
        except ValueError as exc:
            raise DecodingError(str(exc)) from exc

    async def _score(
        self, prompt_ids: list[int], sample: Sample, params: SamplingParams, stats: ChoiceStats
    ) -> ScoredSample:
        """The pair's scores of one sample (its end-of-turn token included where it ended its
        turn: "stop" is also a stop string's end, so only without stop strings)."""
        pair = self.model.pair
        assert pair is not None
        ids, spans = await self.model.run_pair(pair.encode_answer, sample.text, stats=stats)
        if sample.finish_reason == "stop" and not params.stop:
            ids = [*ids, pair.vocab.eot_ids[0]]
            spans = [*spans, (len(sample.text), len(sample.text))]
        if not ids:
            return ScoredSample(
                sample, 0.0, sample.logprob or 0.0, False, np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool), 0
            )
        try:
            sc = await self.model.run_pair(pair.answer_scores, prompt_ids, ids, 0, stats=stats)
        except ValueError as exc:
            raise DecodingError(str(exc)) from exc
        tau = params.offset_threshold
        with np.errstate(invalid="ignore"):
            if tau is None:
                flagged = np.zeros(len(ids), dtype=bool)
                offset = float(np.sum(sc.delta))
            else:
                flagged = (sc.step_offset <= -tau) if params.offset_scope == "step" else (sc.delta <= -tau)
                offset = float(np.sum(np.where(flagged, sc.delta, 0.0)))
        logprob = sample.logprob if sample.logprob is not None else float(np.sum(sc.log_b))
        stats.max_abs_delta = max(stats.max_abs_delta, float(np.max(np.abs(sc.delta))) if len(ids) else 0.0)
        return ScoredSample(
            sample, offset, logprob, bool(flagged.any()), np.asarray(spans), sc.delta, flagged, len(ids)
        )

    async def _pick(
        self,
        scored: list[ScoredSample],
        pick: int,
        params: SamplingParams,
        stats: ChoiceStats,
        prompt_ids: list[int],
        rng: np.random.Generator,
    ) -> Piece:
        """The answer: sample ``pick``, or the scope action where it is in scope."""
        chosen = scored[pick]
        if pick != 0 or chosen.in_scope:
            stats.offset_changed += 1  # another answer than the remote's first
        if not chosen.in_scope:
            return self._answer(chosen.sample, stats, chosen.tokens)
        if self.model.scope_action == "rewrite":
            return await self._rewrite(prompt_ids, chosen, params, rng, stats)
        if self.model.scope_action == "mask":
            text = mask(
                chosen.sample.text,
                flagged_spans(chosen.sample.text, chosen.spans, chosen.delta, chosen.flagged),
            )
            stats.completion_tokens = chosen.sample.completion_tokens or chosen.tokens
            return Piece(text, [], chosen.sample.finish_reason)
        ids, _ = await self.model.run_pair(self.model.pair.encode_answer, self.model.refusal, stats=stats)  # type: ignore[union-attr]
        stats.completion_tokens = len(ids)
        stats.refused = True
        return Piece(self.model.refusal, [], "stop")

    async def _rewrite(
        self,
        prompt_ids: list[int],
        chosen: ScoredSample,
        params: SamplingParams,
        rng: np.random.Generator,
        stats: ChoiceStats,
    ) -> Piece:
        """``scope_action = "rewrite"``: the sample up to the start of its first in-scope word
        (or name), then the pair writes on, one local token at a time from B's top-k
        candidates, q ∝ p_B^(1/T)·exp(α·Δ_scoped) (:func:`proxy.decoding.offset.target_logits`),
        until the end of its turn or ``max_tokens``."""
        pair = self.model.pair
        assert pair is not None
        text = chosen.sample.text
        spans = flagged_spans(text, chosen.spans, chosen.delta, chosen.flagged)
        # the pair writes on from before the word's space, as a tokenizer would split the text
        head = text[: spans[0]["start"]].rstrip(" ") if spans else text
        ids, _ = await self.model.run_pair(pair.encode_answer, head, stats=stats)
        out = head.encode()
        finish = "length"
        eot = pair.vocab.eot_ids
        while len(ids) < params.max_tokens:
            try:
                sc = await self.model.run_pair(
                    pair.answer_scores, [*prompt_ids, *ids], [eot[0]], self.model.top_k, stats=stats
                )
            except ValueError:
                break  # the pair's context is full
            cands = [int(c) for c in sc.top_ids[0]]
            ell = np.array(
                [
                    float(v) if (pair.vocab.token_bytes[c] is not None or c in eot) else -np.inf
                    for c, v in zip(cands, sc.top_log_b[0], strict=True)
                ]
            )
            scores = target_logits(
                ell,
                np.asarray(sc.top_delta[0], dtype=np.float64),
                temperature=params.temperature,
                alpha=params.alpha,
                threshold=params.offset_threshold,
                scope=params.offset_scope,
            )
            try:
                idx, _ = choose(scores, temperature=params.temperature, top_p=params.top_p, rng=rng)
            except NoUsableCandidates:
                break
            token = cands[idx]
            if token in eot:
                finish = "stop"
                break
            ids.append(token)
            out += pair.vocab.token_bytes[token] or b""
        stats.completion_tokens = len(ids)
        written, _ = split_incomplete_utf8(out)
        return self._answer(cut_at_stop(Sample(written, finish), params.stop), stats, len(ids))

    @staticmethod
    def _answer(sample: Sample, stats: ChoiceStats, tokens: int = 0) -> Piece:
        stats.completion_tokens = sample.completion_tokens or tokens
        return Piece(sample.text, [], sample.finish_reason)


def sequence_weights(sum_deltas: np.ndarray, alpha: float) -> np.ndarray:
    """Resampling weights of sequence mode, ``[n]``, summing to 1: w_i ∝ exp(α·ΣΔ_i), where
    ΣΔ_i is the i-th sample's (scoped) offset: log P_U(y_i | x) − log P_B(y_i | x) (nats)
    summed over its tokens (in scope). Self-normalised importance resampling (Rubin 1987;
    Smith & Gelfand 1992) of the remote's samples toward the sequence-level target
    p(y)·exp(α·ΣΔ(y)), the product over positions of δ-unlearning's per-token factor
    (arXiv 2404.11045, Eq. 3) without its per-step normalisation. A sample with ΣΔ = −inf
    gets weight 0; when every one has, the weights are uniform.
    """
    logw = alpha * np.asarray(sum_deltas, dtype=np.float64)
    logw[np.isnan(logw)] = -np.inf
    top = logw.max()
    if top == -np.inf:
        return np.full(len(logw), 1.0 / len(logw))
    w = (logw == np.inf).astype(np.float64) if top == np.inf else np.exp(logw - top)
    return w / w.sum()
