"""The offset-decoding math, pure and small (numpy only).

Target distribution at step t over the remote's candidate set S_t (DESIGN.md;
δ-unlearning, Huang et al., arXiv 2404.11045, Eq. 3, with the remote's
temperature T applied to its own logits as in proxy-tuning, arXiv 2401.08565):

    q_t(c) ∝ exp( ℓ_t(c) / T + α·Δ_t(c) ),   c ∈ S_t

T = 0 means argmax of ℓ + α·Δ. top_p (nucleus, Holtzman et al. 2020) is
applied to q, not to the remote. Candidates with a non-finite logprob or Δ get
probability zero.
"""

from __future__ import annotations

import numpy as np


class NoUsableCandidates(ValueError):
    """Every candidate had a non-finite logprob or offset."""


def target_logits(remote_logprobs: np.ndarray, delta: np.ndarray, *, temperature: float, alpha: float) -> np.ndarray:
    """Unnormalised log q, ``[k]`` float64; ``-inf`` where a candidate is unusable.

    ``temperature == 0`` returns ℓ + α·Δ (the greedy score).
    """
    ell = np.asarray(remote_logprobs, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    if ell.shape != d.shape:
        raise ValueError(f"logprobs {ell.shape} and offsets {d.shape} differ in shape")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    scale = 1.0 if temperature == 0 else 1.0 / temperature
    offset = alpha * d if alpha != 0 else np.zeros_like(d)  # α = 0 ignores Δ, even a non-finite one
    out = ell * scale + offset  # log q + const   (arXiv 2404.11045, Eq. 3)
    out[~np.isfinite(out)] = -np.inf
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-normalise ``x`` (``-inf`` entries stay ``-inf``).

    Raises:
        NoUsableCandidates: every entry is ``-inf``.
    """
    top = np.max(x) if x.size else -np.inf
    if not np.isfinite(top):
        raise NoUsableCandidates("no candidate has a finite score")
    z = x - top
    return z - np.log(np.sum(np.exp(z)))


def apply_top_p(logq: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most probable candidates whose mass reaches
    ``top_p`` and renormalise; ``top_p >= 1`` is the identity."""
    if top_p >= 1.0:
        return logq
    order = np.argsort(-logq, kind="stable")
    probs = np.exp(logq[order])
    before = np.cumsum(probs) - probs  # mass strictly above each candidate
    keep = order[before < top_p]
    out = np.full_like(logq, -np.inf)
    out[keep] = logq[keep]
    return log_softmax(out)


def choose(scores: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Pick a candidate index from unnormalised ``scores`` (:func:`target_logits`).

    Returns the index and log q (the distribution actually sampled from; for
    T = 0, the softmax of the greedy scores, reported as logprobs).
    """
    logq = log_softmax(scores)
    if temperature == 0:
        return int(np.argmax(scores)), logq
    logq = apply_top_p(logq, top_p)
    p = np.exp(logq)
    return int(rng.choice(len(p), p=p / p.sum())), logq
