"""The offset-decoding math, pure and small (numpy only).

Target distribution at step t over the remote's candidate set S_t (docs/concepts.md;
δ-unlearning, Huang et al., arXiv 2404.11045, Eq. 3, with the remote's
temperature T applied to its own logits as in proxy-tuning, arXiv 2401.08565):

    q_t(c) ∝ exp( ℓ_t(c) / T + α·Δ_t(c) ),   c ∈ S_t

T = 0 means argmax of ℓ + α·Δ. top_p (nucleus, Holtzman et al. 2020) is
applied to q, not to the remote. Candidates with a non-finite logprob or Δ get
probability zero.

Scope threshold τ (optional, ``offset_threshold``): a step whose expected
offset under the remote's own distribution p_t (ℓ_t normalised over S_t),

    s_t = Σ_c p_t(c) · Δ_t(c)    (nats; ≤ 0 when U finds the remote's likely
                                   continuations less probable than B does),

is above −τ is out of forget scope and takes Δ_t = 0: the remote's
distribution passes unchanged. This is the forget-scope test of redaction
(an offset below −T marks forget-set content) applied per step. A small
offset is never exactly zero out of scope, and greedy answers flip at
near-ties; the threshold keeps out-of-scope answers identical to the
remote's. ``None`` applies the offset at every step (the paper's rule).
"""

from __future__ import annotations

import numpy as np


class NoUsableCandidates(ValueError):
    """Every candidate had a non-finite logprob or offset."""


def scope_score(remote_logprobs: np.ndarray, delta: np.ndarray) -> float:
    """s_t = Σ p_t(c)·Δ_t(c) (nats), p_t the remote's logprobs renormalised over
    the candidates; ``-inf`` when a candidate the remote gives mass has Δ = −∞
    (bytes U and B cannot represent), ``0.0`` when no candidate is usable."""
    ell = np.asarray(remote_logprobs, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    ok = np.isfinite(ell)
    if not ok.any():
        return 0.0
    p = np.exp(ell[ok] - np.max(ell[ok]))
    p /= p.sum()
    dd = d[ok]
    if np.any(np.isnan(dd)) or np.any((dd == -np.inf) & (p > 0)):
        return -np.inf
    dd = np.where(np.isfinite(dd), dd, 0.0)
    return float(np.sum(p * dd))


def target_logits(
    remote_logprobs: np.ndarray,
    delta: np.ndarray,
    *,
    temperature: float,
    alpha: float,
    threshold: float | None = None,
) -> np.ndarray:
    """Unnormalised log q, ``[k]`` float64; ``-inf`` where a candidate is unusable.

    ``temperature == 0`` returns ℓ + α·Δ (the greedy score). ``threshold`` τ ≥ 0
    (nats): when :func:`scope_score` is above −τ the step is out of scope and
    Δ is ignored (see the module docstring).
    """
    ell = np.asarray(remote_logprobs, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    if ell.shape != d.shape:
        raise ValueError(f"logprobs {ell.shape} and offsets {d.shape} differ in shape")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if threshold is not None and not threshold >= 0:
        raise ValueError("threshold must be >= 0")
    # A tiny T must not overflow: ℓ is shifted so that its top is 0 (q is shift-invariant)
    # and 1/T is capped at the largest float, so the top stays 0 and the rest fall to -inf.
    scale = 1.0 if temperature == 0 else min(1.0 / temperature, float(np.finfo(np.float64).max))
    finite = ell[np.isfinite(ell)]
    shifted = ell - finite.max() if finite.size and temperature != 0 else ell
    # α = 0, or a step out of scope, ignores Δ, even a non-finite one
    applies = alpha != 0 and (threshold is None or scope_score(ell, d) <= -threshold)
    offset = alpha * d if applies else np.zeros_like(d)
    with np.errstate(over="ignore", invalid="ignore"):
        out = shifted * scale + offset  # log q + const   (arXiv 2404.11045, Eq. 3)
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


def predicted_acceptance(
    log_u: np.ndarray,
    log_b: np.ndarray,
    *,
    alpha: float,
    temperature: float,
    threshold: float | None = None,
    top_k: int | None = None,
    top_k_drafts: bool = False,
) -> float:
    """How likely a drafted token is to be accepted at the next position, predicted
    by the pair alone before the remote is asked, with B standing in for the remote.

    ``log_u``, ``log_b``: the pair's next-token log-probabilities (nats, ``[V]``, the
    whole local vocabulary). S is B's ``top_k`` tokens (the remote's S_t; the whole
    vocabulary when ``None``). With Δ = log P_U − log P_B, q ∝ exp(log P_B / T + α·Δ)
    over S (:func:`target_logits`) and p the draft law: P_B (drafts sampled at T = 1
    from the whole vocabulary), or P_B renormalised over S when ``top_k_drafts``
    (:attr:`adapters.base.Capabilities.top_k_drafts`):

    - the step is out of scope when s = Σ_S P_B·Δ (:func:`scope_score`; over the whole
      vocabulary that is −KL(P_B ‖ P_U)) is above −τ: 1.0, as q = p there;
    - T = 0: 1.0 when argmax q is argmax p, else 0.0 (greedy acceptance);
    - T > 0: Σ_S min(p, q), the acceptance rate of speculative sampling
      (Leviathan et al. 2023, arXiv 2211.17192, Section 3.3, β = Σ min(p, q)).

    Only the draft's *length* uses it (:class:`proxy.decoding.speculative.DraftLength`), never
    the acceptance test itself, so a wrong prediction costs time, not exactness.
    """
    lu = np.asarray(log_u, dtype=np.float64)
    lb = np.asarray(log_b, dtype=np.float64)
    if alpha == 0:
        return 1.0
    if top_k is not None and top_k < lb.size:
        keep = np.argpartition(-lb, top_k - 1)[:top_k]
        lu, lb = lu[keep], lb[keep]
    p = np.exp(lb)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.where(p > 0, lu - lb, 0.0)  # no Δ where B gives no mass (q is 0 there too)
    if threshold is not None and scope_score(lb, delta) > -threshold:
        return 1.0
    scores = target_logits(lb, delta, temperature=temperature, alpha=alpha)
    if temperature == 0:
        return float(int(np.argmax(scores)) == int(np.argmax(lb)))
    if top_k_drafts:
        p = np.exp(log_softmax(lb))
    return float(np.minimum(p, np.exp(log_softmax(scores))).sum())
