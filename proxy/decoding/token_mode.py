"""Token mode: offset decoding token by token over the remote's top-k logprobs, with
speculative acceptance of the remote's drafts (arXiv 2404.11045, Eq. 3).

Flow of one step: the adapter gives the remote's top-k candidates S_t; the aligner gives Δ
for each (:mod:`proxy.decoding.alignment`); :mod:`proxy.decoding.offset` turns ℓ + α·Δ into q
and picks a candidate (:mod:`proxy.decoding.speculative` for drafted positions); the chosen
bytes are committed to both the remote's context and the aligner; text is released by
:class:`proxy.decoding.text.TextReleaser`. The pair runs on its worker threads behind
:meth:`ServedModel.run_pair <proxy.decoding.served.ServedModel.run_pair>`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import numpy as np

from adapters.base import (
    Candidate,
    Context,
    ContextExhausted,
    Position,
    RemoteBadResponse,
    find_token,
)
from proxy.decoding.drafts import open_draft
from proxy.decoding.offset import NoUsableCandidates, choose, flip_margin, predicted_acceptance, target_logits
from proxy.decoding.protocols import Served
from proxy.decoding.speculative import PREDICT_ABOVE, DraftLength, on_demand_chunk, speculative_pick
from proxy.decoding.text import TextReleaser, inside_character
from proxy.decoding.types import ChoiceStats, DecodingError, Piece, SamplingParams, TokenOut, display_token, finite

log = logging.getLogger(__name__)


class TokenDecoder:
    """Token mode for one served model (its settings are the model's). Holds only what is
    logged once per model."""

    def __init__(self, model: Served) -> None:
        self.model = model
        self._warned_top_k = False
        self._warned_dropped = False

    async def generate(
        self, base: Context, params: SamplingParams, rng: np.random.Generator, stats: ChoiceStats
    ) -> AsyncGenerator[Piece, None]:
        """Decode one choice token by token; yields :class:`Piece` objects, the last with a
        finish reason.

        Raises:
            adapters.base.RemoteError: the remote failed after retries.
            DecodingError: the pair cannot take this prompt.
        """
        aligner = None
        pair = self.model.pair if self.model.uses_offset and params.alpha != 0 else None
        if pair is not None:
            try:
                prompt_ids = await self.model.run_pair(pair.prompt_ids, base.messages, base.prompt, stats=stats)
            except ValueError as exc:
                raise DecodingError(str(exc)) from exc
            aligner = pair.aligner(prompt_ids, same_tokenizer=self.model.same_tokenizer)
        releaser = TextReleaser(params.stop)
        # A base context with an assistant prefix continues that text (redaction's regenerate
        # mode); the pieces yielded are the new text only.
        prefix, last = base.assistant_prefix, b""
        ids: list[int] | None = [] if self.model.adapter.capabilities.token_ids and not prefix else None
        if aligner is not None and prefix:
            await self.model.run_pair(aligner.commit, prefix)
        # The first draft's length comes from the model's running acceptance rate, which other
        # requests move; a request with a seed starts from the prior instead, so that its answer
        # depends on the request alone (draft lengths decide which random draws go where).
        prior = self.model.acceptance_rate if params.seed is None else 1.0
        greedy = params.temperature == 0
        # Draft lengths from the measured cost of a round, except for a seeded request at T > 0
        # (see prior; a greedy answer is the same whatever its draft lengths)
        cost = self.model.draft_cost if params.seed is None or greedy else None
        lengths = DraftLength(self.model.max_draft_tokens, prior, cost=cost) if self.model.speculative else None
        context_full = False
        batcher = getattr(self.model.pair, "batcher", None) if aligner is not None else None
        if batcher is not None:
            batcher.open_stream()
        first_round = True  # the request's usage counts its first call's prompt
        on_demand = self.model.adapter.capabilities.drafts_on_demand
        gated = getattr(aligner, "gate", None) is not None
        gate_open: bool | None = None  # the scope gate at the last position scored (None: not yet)
        open_examined = open_accepted = 0  # drafted positions examined where the gate was open, and accepted
        try:
            while stats.completion_tokens < params.max_tokens and not context_full:
                pair_before = stats.pair_seconds
                left = params.max_tokens - stats.completion_tokens
                if lengths is None:
                    n = 1
                elif on_demand:
                    # Positions computed only as read: a draft cut early costs nothing past its cut.
                    n = min(lengths.maximum, left)
                else:
                    n = lengths.next(left)
                    if n > PREDICT_ABOVE and aligner is not None:
                        n = min(n, await self._predicted_length(aligner, lengths, params, stats))
                ctx = Context(base.messages, base.prompt, prefix, tuple(ids) if ids is not None else None, last)
                seed = int(rng.integers(2**31)) if params.seed is not None and n > 1 else None
                called = time.perf_counter()
                try:
                    drafted = await open_draft(self.model, ctx, n, greedy=greedy, seed=seed, stats=stats)
                except ContextExhausted:
                    if n > 1 and lengths is not None:
                        # Servers such as vLLM refuse prompt + max_tokens beyond their context:
                        # shorter drafts for the rest of this answer.
                        lengths.maximum = n // 2
                        continue
                    if stats.completion_tokens == 0:
                        raise  # the prompt alone does not fit: a 400
                    break  # the context is full: the answer ends as if max_tokens were reached
                # A one-token call's sampled token may come from a filtered distribution, and after
                # a partial character the first position is healed (its sampled token is not a plain
                # draft): such a position is drawn from q directly, and the draft goes on only when
                # the draw is the drafted token (still exact: later drafted tokens are samples given it).
                remote_s = time.perf_counter() - called
                direct = 0 if n > 1 and not inside_character(prefix) else 1
                # The pair scores the draft in chunks (one tree pass each), growing while they
                # are accepted: the first is the run the acceptance rate expects, so that an
                # out-of-scope draft costs one pass and an in-scope one little wasted work. A
                # streamed draft's chunk is scored as soon as it has arrived, while the remote
                # writes the rest, and the stream is closed at the first replaced token (the
                # remote stops). Chunks grow as for a whole draft: capping them to score beside
                # the remote slowed both where they share the cores (docs/benchmarks.md). A
                # draft computed as read is scored in short chunks while the scope gate is open
                # (:func:`proxy.decoding.speculative.on_demand_chunk`).
                done, chunk, more = 0, lengths.expected_run() if lengths is not None else 1, True
                if on_demand:  # nothing computed past the chunk; in scope short chunks
                    chunk = on_demand_chunk(None, gate_open, gated=gated, expected_run=chunk)
                failed = False
                try:
                    while more:
                        part = await drafted.get(done, chunk)
                        if not part:
                            break
                        try:
                            scored = await self._score(part, aligner, stats)
                        except ContextExhausted:
                            if len(part) > 1:
                                # The pair's context cannot take this chunk's tree: smaller chunks
                                # and drafts from here on.
                                chunk = len(part) // 2
                                if lengths is not None:
                                    lengths.maximum = max(2, chunk)
                                continue
                            if stats.completion_tokens == 0:
                                raise
                            context_full = True
                            break
                        opened = getattr(aligner, "last_opened", None)
                        for j, (pos, (cands, ell, delta)) in enumerate(zip(part, scored, strict=False)):
                            if opened is not None and j < len(opened):
                                gate_open = opened[j]
                            idx, logq, ok, changed = self._pick(
                                pos, cands, ell, delta, params, rng, direct=done + j < direct, stats=stats
                            )
                            if done + j >= direct and lengths is not None:
                                stats.accepted_tokens += int(ok)
                                lengths.update(int(ok), 1)
                                if gate_open:
                                    open_examined += 1
                                    open_accepted += int(ok)
                            if not ok:
                                await drafted.close()  # the remote stops now, not after this token's commit
                            chosen = cands[idx]
                            stats.completion_tokens += 1
                            if chosen.is_eot:
                                await drafted.end_round(stats, first_round)  # usage final before the last piece
                                yield releaser.finish("stop")
                                return
                            assert chosen.data is not None
                            tok = self._token_out(idx, cands, logq, params, changed)
                            if aligner is not None:
                                await self.model.run_pair(aligner.commit, chosen.data, stats=stats)
                            prefix += chosen.data
                            last = chosen.data
                            if ids is not None:
                                if chosen.token_id is None:
                                    ids = None
                                else:
                                    ids.append(chosen.token_id)
                            piece = releaser.push(tok)
                            if piece.finish_reason is not None:
                                await drafted.end_round(stats, first_round)
                                yield piece
                                return
                            yield piece
                            if not ok or stats.completion_tokens >= params.max_tokens:
                                more = False
                                break
                        more = more and len(scored) == len(part)
                        done += len(part)
                        if on_demand:
                            chunk = on_demand_chunk(chunk, gate_open, gated=gated, expected_run=chunk)
                        else:
                            chunk *= 2
                except BaseException:
                    failed = True
                    raise
                finally:
                    ended = time.perf_counter()
                    await drafted.end_round(stats, first_round and not failed)
                first_round = False
                if lengths is not None:  # the round's cost, for the next drafts' lengths
                    # (a streamed round's pair passes overlap the remote: its wall time)
                    if drafted.streamed:
                        seconds = ended - called
                    else:
                        seconds = remote_s + stats.pair_seconds - pair_before
                    self.model.draft_cost.observe(drafted.received, seconds)
            yield releaser.finish("length")
        finally:
            if batcher is not None:
                batcher.close_stream()
            if lengths is not None and lengths.examined:
                # The model's running rate seeds the next request's first draft length.
                self.model.acceptance_rate = (
                    0.8 * self.model.acceptance_rate + 0.2 * lengths.accepted / lengths.examined
                )
            if open_examined:
                self.model.scope_acceptance_rate = (
                    0.8 * self.model.scope_acceptance_rate + 0.2 * open_accepted / open_examined
                )

    async def _predicted_length(
        self, aligner: Any, lengths: DraftLength, params: SamplingParams, stats: ChoiceStats
    ) -> int:
        """The longest draft worth asking for at the next position, as the pair alone
        predicts it (:func:`proxy.decoding.offset.predicted_acceptance`, B standing in for the
        remote): where the offset would change the token, a long draft would be thrown
        away after its first position, so the draft is as long as that rate warrants
        (:meth:`DraftLength.length_for`). Where the scope gate is open on B's row there (in
        forget scope), the rate is at most the model's running rate where the gate was open
        (:attr:`ServedModel.scope_acceptance_rate
        <proxy.decoding.served.ServedModel.scope_acceptance_rate>`; not for a seeded request
        at T > 0, whose draft lengths must not depend on other requests): an answer's first
        draft would otherwise be sized for the out-of-scope rate that the model's running rate
        mostly measures, and the remote would write tokens past the first replaced one for
        nothing. The trunk's pending tokens are run now instead
        of with the draft's tree, so this costs one extra forward pass at most; the
        acceptance test itself does not use the prediction (exactness is unchanged)."""
        next_rows = getattr(aligner, "next_rows", None)  # aligners without the pair's own rows: no prediction
        if next_rows is None:
            return lengths.maximum
        try:
            rows = await self.model.run_pair(next_rows, stats=stats)
        except (ValueError, ContextExhausted):  # the draft's own scoring meets and handles these
            return lengths.maximum
        if rows is None:
            return lengths.maximum
        rate = predicted_acceptance(
            rows[0],
            rows[1],
            alpha=params.alpha,
            temperature=params.temperature,
            threshold=params.offset_threshold,
            scope=params.offset_scope,
            top_k=self.model.top_k,
            top_k_drafts=self.model.adapter.capabilities.top_k_drafts,
        )
        gate = getattr(aligner, "gate", None)
        if gate is not None and (params.seed is None or params.temperature == 0) and bool(gate.open(rows[1][None, :])[0]):
            rate = min(rate, self.model.scope_acceptance_rate)
        n = lengths.length_for(rate)
        stats.predicted_short += int(n < lengths.maximum)
        return n

    def _pick(
        self,
        pos: Position,
        cands: list[Candidate],
        ell: np.ndarray,
        delta: np.ndarray,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        direct: bool,
        stats: ChoiceStats,
    ) -> tuple[int, np.ndarray, bool, bool]:
        """The token at one position: its index in S_t, log q, whether it is the drafted
        token (so that the draft may go on) and whether the offset changed the argmax.

        ``direct``: drawn from q (:func:`proxy.decoding.offset.choose`); otherwise the drafted
        token is accepted or replaced (:func:`speculative_pick`).

        Raises:
            RemoteBadResponse: every candidate is unusable.
        """
        scores = target_logits(
            ell,
            delta,
            temperature=params.temperature,
            alpha=params.alpha,
            threshold=params.offset_threshold,
            scope=params.offset_scope,
        )
        if stats.scope_trace is not None and self.model.uses_offset and params.alpha != 0:
            stats.scope_trace.append(flip_margin(ell, delta, params.alpha, params.offset_scope))
        x = find_token(pos.sampled, cands)
        try:
            if direct:
                idx, logq = choose(scores, temperature=params.temperature, top_p=params.top_p, rng=rng)
                ok = x is not None and idx == x
            else:
                idx, logq, ok = speculative_pick(
                    scores, self._draft_law(pos, ell), x, temperature=params.temperature, top_p=params.top_p, rng=rng
                )
        except NoUsableCandidates as exc:
            raise RemoteBadResponse("the upstream's logprobs were unusable (every candidate non-finite)") from exc
        changed = int(np.argmax(scores)) != int(np.argmax(ell))  # argmax of ℓ/T is argmax of ℓ
        stats.offset_changed += int(changed)
        return idx, logq, ok, changed

    def _draft_law(self, pos: Position, ell: np.ndarray) -> np.ndarray:
        """log p_t over S_t (``[k]``, nats): the law the remote drew this position's drafted
        token from. The remote's logprobs ℓ themselves, or, where its drafts are drawn from
        its top-k candidates (:attr:`adapters.base.Capabilities.top_k_drafts`), ℓ less the
        log of the candidates' total mass (every reported candidate, usable or not)."""
        if not self.model.adapter.capabilities.top_k_drafts:
            return ell
        every = np.array([c.logprob for c in pos.candidates], dtype=np.float64)
        every = every[np.isfinite(every)]
        if find_token(pos.sampled, pos.candidates) is None and not self._warned_top_k:
            self._warned_top_k = True
            log.warning(
                "model %s: the remote drafted a token outside its top-%d although top_k drafts were asked for; "
                "it may ignore top_k, and then speculative acceptance is not exact (set speculative: false)",
                self.model.name,
                len(pos.candidates),
            )
        return ell - float(np.logaddexp.reduce(every)) if every.size else ell

    async def _score(
        self, positions: Sequence[Position], aligner: Any, stats: ChoiceStats
    ) -> list[tuple[list[Candidate], np.ndarray, np.ndarray]]:
        """The usable remote candidates S_t, their logprobs ℓ and offsets Δ (``[k]`` each)
        at each position of a draft, position j after the drafted tokens before it
        (one tree pass of the pair for all of them). Fewer entries when the pair cannot
        represent a drafted token (the draft cannot be accepted past it).

        Raises:
            ContextExhausted: the pair's context is full.
            RemoteBadResponse: a position without a usable candidate.
        """
        out: list[tuple[list[Candidate], np.ndarray]] = []
        for position in positions:
            cands = [c for c in position.candidates if c.usable]
            dropped = [c for c in position.candidates if c.data is None and not c.is_eot]
            if dropped:
                if not self._warned_dropped:  # once per model: it is common (byte-level tokens), not news
                    self._warned_dropped = True
                    log.warning(
                        "model %s: candidate(s) with unknown bytes (a partial UTF-8 character or a special token) "
                        "left out of S_t (logged once per model; each choice counts them)",
                        self.model.name,
                    )
                stats.dropped_candidates += len(dropped)
            if not cands:
                if out:  # a later position: the draft stops before it (a new call will ask again)
                    break
                raise RemoteBadResponse(
                    "the upstream's logprobs were unusable (no candidate with known bytes and a finite logprob)"
                )
            out.append((cands, np.array([c.logprob for c in cands])))
        if aligner is None:
            return [(c, ell, np.zeros(len(c))) for c, ell in out]
        chain = [p.sampled.data or b"" for p in positions[: len(out) - 1]]
        cand_bytes = [[None if c.is_eot else c.data for c in cands] for cands, _ in out]
        try:
            deltas = await self.model.run_pair(aligner.draft_deltas, chain, cand_bytes, stats=stats)
        except ValueError as exc:
            raise DecodingError(str(exc)) from exc
        stats.max_abs_delta = max(stats.max_abs_delta, aligner.last_max_abs_delta)
        return [(c, ell, d) for (c, ell), d in zip(out, deltas, strict=False)]

    @staticmethod
    def _token_out(
        idx: int, cands: list[Candidate], logq: np.ndarray, params: SamplingParams, changed: bool
    ) -> TokenOut:
        chosen = cands[idx]
        top: tuple[tuple[str, bytes | None, float], ...] = ()
        if params.logprobs and params.top_logprobs:
            order = np.argsort(-logq, kind="stable")[: params.top_logprobs]
            top = tuple(
                (
                    cands[i].token if cands[i].is_eot else display_token(cands[i].data or b""),
                    None if cands[i].is_eot else cands[i].data,
                    finite(float(logq[i])),
                )
                for i in order
            )
        assert chosen.data is not None
        return TokenOut(chosen.data, display_token(chosen.data), finite(float(logq[idx])), top, changed)
