"""Scoring given text through a remote that gives teacher-forced logprobs
(vLLM's ``prompt_logprobs``, :class:`adapters.base.TextScoringAdapter`), and
the served distribution q of that text.

* :class:`PromptLogprobsCache` keeps the remote's answers on disk, keyed by the
  remote (server root and model name), the context, the text and k, so that
  an audit or a training run asks the remote once per text. Entries are JSON,
  written to a temporary file and renamed (never half-written).
* :func:`q_token_logprobs` turns one :class:`~adapters.base.ScoredText` and the
  pair's Δ at its positions into per-token log q. At position t the remote
  gives ℓ_t over its top-k S_t and the answer's own token x_t; q shifts those by
  α·Δ (with the scope threshold τ of :func:`proxy.decoding.offset.target_logits`) and
  keeps the rest of the remote's mass, 1 − Σ_{S_t ∪ {x_t}} e^{ℓ_t}, as one
  bucket with Δ = 0::

      log q(x_t) = ℓ_t(x_t) + α·Δ_t(x_t) − log( Σ_{c ∈ S_t ∪ {x_t}} e^{ℓ_t(c) + α·Δ_t(c)} + rest_t )

  With α = 0 (or out of scope) this is the remote's own logprob of x_t, so
  rows with and without the offset are comparable. The offset is known only
  on S_t ∪ {x_t}; serving samples from S_t (docs/concepts.md).
* :func:`scored_deltas` computes Δ at every position with the pair's
  :class:`~proxy.decoding.alignment.Aligner` (one tree pass, either tokenizer path), the
  answer's tokens as the chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import Candidate, Context, Position, ScoredText, TextScoringAdapter, find_token
from proxy.common.files import atomic_write
from proxy.common.literals import ScopeRule
from proxy.decoding.alignment import EOT
from proxy.decoding.offset import choice_lowered, scope_score, scoped_offset

log = logging.getLogger(__name__)


def _candidate_json(c: Candidate) -> list[Any]:
    return [
        None if c.data is None else c.data.hex(),
        c.logprob if math.isfinite(c.logprob) else None,
        c.token,
        c.token_id,
        c.is_eot,
    ]


def _candidate(row: list[Any]) -> Candidate:
    data, lp, token, tid, eot = row
    return Candidate(
        None if data is None else bytes.fromhex(data), -math.inf if lp is None else float(lp), token, tid, bool(eot)
    )


class PromptLogprobsCache:
    """Remote scores of given text on disk (``<folder>/<key[:2]>/<key>.json``).

    The key is the sha256 of the remote's identity (server root and model
    name), the context (messages or prompt), the text and k: a changed model
    behind the same name is not noticed, so point ``folder`` elsewhere (or
    clear it) when the upstream's weights change.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(identity: str, ctx: Context, text: str, top_k: int) -> str:
        payload = json.dumps(
            {
                "format": 2,
                "remote": identity,
                "messages": ctx.messages,
                "prompt": ctx.prompt,
                "text": text,
                "top_k": top_k,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> ScoredText | None:
        try:
            raw = json.loads(self._path(key).read_text(encoding="utf-8"))
            positions = tuple(
                Position(tuple(_candidate(c) for c in p["candidates"]), _candidate(p["own"])) for p in raw["positions"]
            )
            return ScoredText(
                tuple(int(t) for t in raw["token_ids"]), positions, tuple(int(t) for t in raw.get("prompt_ids", ()))
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("prompt-logprobs cache entry %s is unreadable (%s); asking the remote again", key, exc)
            return None

    def put(self, key: str, scored: ScoredText) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "token_ids": list(scored.token_ids),
            "prompt_ids": list(scored.prompt_ids),
            "positions": [
                {"candidates": [_candidate_json(c) for c in p.candidates], "own": _candidate_json(p.sampled)}
                for p in scored.positions
            ],
        }
        atomic_write(path, json.dumps(body))


async def score_text(
    adapter: TextScoringAdapter, ctx: Context, text: str, *, top_k: int, cache: PromptLogprobsCache | None = None
) -> ScoredText:
    """``adapter.score_text`` through ``cache`` (see :class:`PromptLogprobsCache`).

    Raises:
        the adapter's errors (:meth:`adapters.base.TextScoringAdapter.score_text`).
    """
    identity = str(getattr(adapter, "identity", getattr(adapter, "name", "")))
    key = PromptLogprobsCache.key(identity, ctx, text, top_k) if cache is not None else ""
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    scored = await adapter.score_text(ctx, text, top_k=top_k)
    if cache is not None:
        cache.put(key, scored)
    return scored


def with_token_bytes(scored: ScoredText, token_bytes: Sequence[bytes | None], eot_ids: Sequence[int]) -> ScoredText:
    """``scored`` with every candidate's bytes taken from its token id in ``token_bytes``
    (the pair's vocabulary, for a remote that shares its tokenizer: the recovery in docs/concepts.md, "Scoring given text"
    "from the token id"), so that tokens holding part of a character keep their bytes."""

    def fix(c: Candidate) -> Candidate:
        if c.token_id is None or not 0 <= c.token_id < len(token_bytes):
            return c
        if c.token_id in eot_ids:
            return Candidate(b"", c.logprob, c.token, c.token_id, True)
        data = token_bytes[c.token_id]
        return c if data is None else Candidate(data, c.logprob, c.token, c.token_id, c.is_eot)

    positions = tuple(Position(tuple(fix(c) for c in p.candidates), fix(p.sampled)) for p in scored.positions)
    return ScoredText(scored.token_ids, positions, scored.prompt_ids)


def support(position: Position) -> list[Candidate]:
    """S_t ∪ {x_t}: the top-k, then the answer's own token when it is not among them
    (:func:`adapters.base.same_token`)."""
    cands = list(position.candidates)
    own = position.sampled
    i = find_token(own, cands)
    if i is None:
        cands.append(own)
    else:
        cands[i] = own  # the same token; the answer's copy may have bytes recovered from the text
    return cands


def own_index(position: Position, cands: Sequence[Candidate]) -> int:
    """Where the answer's own token sits in ``cands`` (its :func:`support`)."""
    own = position.sampled
    i = find_token(own, cands)
    # No id and unknown bytes match nothing: support() appended the answer's own entry.
    return i if i is not None else list(cands).index(own)


def scored_deltas(aligner: Any, scored: ScoredText, *, chunk: int = 32) -> list[np.ndarray] | None:
    """Δ (float64 nats) for each position's :func:`support`, from ``aligner`` (a fresh
    :class:`~proxy.decoding.alignment.Aligner` on the prompt) in one tree pass; ``None`` when
    the answer's token bytes are not all known (:func:`adapters.utf8.answer_token_bytes`)."""
    if any(p.sampled.data is None for p in scored.positions):
        return None
    chain = [p.sampled.data or b"" for p in scored.positions[:-1]]
    supports = [support(p) for p in scored.positions]
    # Candidates whose bytes are unknown (a partial character) get Δ = −inf: out of q.
    known = [[i for i, c in enumerate(cs) if c.is_eot or c.data is not None] for cs in supports]
    cands = [[EOT if cs[i].is_eot else cs[i].data for i in ks] for cs, ks in zip(supports, known, strict=True)]
    # Chunks of positions, one tree pass each, committing as they go (a long answer's
    # whole tree would not fit the pair's context at once).
    scored_known: list[np.ndarray] = []
    for lo in range(0, len(cands), chunk):
        hi = min(lo + chunk, len(cands))
        part = aligner.draft_deltas(chain[lo : hi - 1], cands[lo:hi])
        scored_known.extend(part)
        if len(part) < hi - lo:
            return None
        for data in chain[lo:hi]:
            aligner.commit(data)
    out = []
    for cs, ks, d in zip(supports, known, scored_known, strict=True):
        full = np.full(len(cs), -np.inf)
        full[ks] = d
        out.append(full)
    return out


def q_token_logprobs(
    scored: ScoredText,
    deltas: Sequence[np.ndarray] | None,
    *,
    alpha: float,
    threshold: float | None,
    scope: ScopeRule = "step",
) -> np.ndarray:
    """``[n_tokens]`` float64 log q (nats) of the answer's own tokens (module docstring), with
    scope threshold ``threshold`` under rule ``scope`` (:func:`proxy.decoding.offset.scoped_offset`).

    ``deltas[t]`` are Δ over ``support(positions[t])``; ``None`` (no offset) gives the
    remote's own logprobs. A non-finite Δ of the answer's own token gives −inf.
    """
    out = np.empty(len(scored.positions))
    for t, pos in enumerate(scored.positions):
        cands = support(pos)
        i = own_index(pos, cands)
        ell = np.array([c.logprob for c in cands], dtype=np.float64)
        if deltas is None or alpha == 0:
            out[t] = ell[i]
            continue
        d = np.asarray(deltas[t], dtype=np.float64)
        k = len(pos.candidates)  # the scope score is serving's: over S_t, without an appended x_t
        if scope in ("token", "choice"):
            # choice: decided on S_t as serving decides it, without the appended x_t
            whole = scope == "choice" and threshold is not None and choice_lowered(ell[:k], d[:k], threshold)
            d = d if whole else scoped_offset(ell, d, threshold, "token")
        elif threshold is not None and scope_score(ell[:k], d[:k]) > -threshold:
            out[t] = ell[i]
            continue
        finite = np.isfinite(ell)
        rest = max(0.0, 1.0 - float(np.exp(ell[finite]).sum()))
        with np.errstate(invalid="ignore"):
            s = np.where(finite & np.isfinite(d), ell + alpha * d, -np.inf)
        if not np.isfinite(s[i]):
            out[t] = -np.inf
            continue
        terms = np.append(s[np.isfinite(s)], math.log(rest) if rest > 0 else -np.inf)
        top = terms.max()
        out[t] = s[i] - (top + math.log(np.exp(terms - top).sum()))
    return out
