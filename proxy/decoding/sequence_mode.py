"""Sequence mode: complete samples from the remote, resampled by the offset (for remotes
that cannot continue a partial answer; arXiv 2404.11045, Eq. 3 at the sequence level)."""

from __future__ import annotations

import asyncio

import numpy as np

from adapters.base import Context, SamplingAdapter
from proxy.decoding.protocols import Served
from proxy.decoding.text import cut_at_stop
from proxy.decoding.types import ChoiceStats, DecodingError, Piece, SamplingParams


class SequenceDecoder:
    """Sequence mode for one served model (its settings are the model's)."""

    def __init__(self, model: Served) -> None:
        self.model = model

    async def generate(
        self, base: Context, params: SamplingParams, rng: np.random.Generator, stats: ChoiceStats
    ) -> Piece:
        """Sequence mode (docs/concepts.md, "Fewer remote calls"): ``sequence_samples`` complete
        answers from the remote at the request's settings, each scored by the pair
        teacher-forced (ΣΔ over its local tokens, end of turn included when it ended
        there), one drawn with weight exp(α·ΣΔ) (:func:`sequence_weights`:
        self-normalised importance resampling toward p(y)·exp(α·ΣΔ(y))). T = 0 draws one
        greedy answer (every sample would be the same). With a scope threshold τ, when
        every sample's mean Δ per token is ≤ −τ, the answer is :attr:`refusal`.

        Raises:
            adapters.base.RemoteError: a sample failed after retries.
            DecodingError: the pair cannot take this prompt.
        """
        assert isinstance(self.model.adapter, SamplingAdapter)  # checked in __post_init__
        sampler = self.model.adapter
        if base.assistant_prefix:
            raise DecodingError(
                f"model {self.model.name!r} is served in sequence mode, which cannot continue a partial answer "
                "(redaction's regenerate mode and the audit's extraction prompts need token mode)"
            )
        n = 1 if params.temperature == 0 else self.model.sequence_samples
        seeds = [None if params.seed is None else int(rng.integers(2**31)) for _ in range(n)]
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other samples
                tasks = [
                    group.create_task(
                        sampler.sample(
                            base,
                            max_tokens=params.max_tokens,
                            temperature=params.temperature,
                            top_p=params.top_p,
                            stop=params.stop,
                            seed=seed,
                        )
                    )
                    for seed in seeds
                ]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure, as one remote call's error
        # Stop strings are the proxy's to apply, also where the upstream ignores them.
        samples = [cut_at_stop(t.result(), params.stop) for t in tasks]
        stats.remote_calls += n
        stats.sample_texts = [x.text for x in samples]
        stats.prompt_tokens = next((x.prompt_tokens for x in samples if x.prompt_tokens is not None), None)
        pick, text, finish = 0, samples[0].text, samples[0].finish_reason
        local_tokens: list[int | None] = [None] * n
        pair = self.model.pair if self.model.uses_offset and params.alpha != 0 else None
        if pair is not None:
            try:
                prompt_ids = await self.model.run_pair(pair.prompt_ids, base.messages, base.prompt, stats=stats)
                scored = [
                    await self.model.run_pair(
                        pair.sequence_offset,
                        prompt_ids,
                        x.text,
                        # "stop" is also a stop string's end, which the API does not tell apart
                        # from the end of turn: the end-of-turn token is scored only without stops.
                        x.finish_reason == "stop" and not params.stop,
                        stats=stats,
                    )
                    for x in samples
                ]
            except ValueError as exc:
                raise DecodingError(str(exc)) from exc
            sums = np.array([d for d, _ in scored])
            local_tokens = [k for _, k in scored]
            weights = sequence_weights(sums, params.alpha)
            pick = int(rng.choice(n, p=weights))
            text, finish = samples[pick].text, samples[pick].finish_reason
            means = sums / np.maximum(1, np.array(local_tokens))
            stats.max_abs_delta = float(np.max(np.abs(means))) if n else 0.0
            if params.offset_threshold is not None and np.all(means <= -params.offset_threshold):
                text, finish = self.model.refusal, "stop"
                stats.offset_changed += 1
            elif pick != 0:
                stats.offset_changed += 1  # another answer than the remote's first sample
            stats.sequence_weights = [float(w) for w in weights]
        chosen = samples[pick]
        stats.completion_tokens = chosen.completion_tokens or local_tokens[pick] or 0
        return Piece(text, [], finish)


def sequence_weights(sum_deltas: np.ndarray, alpha: float) -> np.ndarray:
    """Resampling weights of sequence mode, ``[n]``, summing to 1: w_i ∝ exp(α·ΣΔ_i), where
    ΣΔ_i = log P_U(y_i | x) − log P_B(y_i | x) (nats) of the i-th sample, drawn from the
    remote. Self-normalised importance resampling (Rubin 1987; Smith & Gelfand 1992) of
    the remote's samples toward the sequence-level target p(y)·exp(α·ΣΔ(y)), the
    product over positions of δ-unlearning's per-token factor (arXiv 2404.11045, Eq. 3)
    without its per-step normalisation. A sample with ΣΔ = −inf gets weight 0; when
    every one has, the weights are uniform.
    """
    logw = alpha * np.asarray(sum_deltas, dtype=np.float64)
    logw[np.isnan(logw)] = -np.inf
    top = logw.max()
    if top == -np.inf:
        return np.full(len(logw), 1.0 / len(logw))
    w = (logw == np.inf).astype(np.float64) if top == np.inf else np.exp(logw - top)
    return w / w.sum()
