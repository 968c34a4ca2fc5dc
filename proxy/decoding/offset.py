"""The offset-decoding math, pure and small (numpy only).

Target distribution at step t over the remote's candidate set S_t (docs/concepts.md;
δ-unlearning, Huang et al., arXiv 2404.11045, Eq. 3, with the remote's
temperature T applied to its own logits as in proxy-tuning, arXiv 2401.08565):

    q_t(c) ∝ exp( ℓ_t(c) / T + α·Δ_t(c) ),   c ∈ S_t

T = 0 means argmax of ℓ + α·Δ. top_p (nucleus, Holtzman et al. 2020) is
applied to q, not to the remote. Candidates with a non-finite logprob or Δ get
probability zero.

Scope threshold τ (optional, ``offset_threshold``, nats) and its rule (``offset_scope``)
keep the offset out of answers outside the forget scope (a small offset is never exactly
zero there, and greedy answers flip at near-ties). ``None`` applies Δ everywhere (the
paper's rule). Three rules:

* ``step``: a step whose expected offset under the remote's own distribution p_t
  (ℓ_t normalised over S_t),

      s_t = Σ_c p_t(c) · Δ_t(c)    (nats; ≤ 0 when U finds the remote's likely
                                    continuations less probable than B does),

  is above −τ takes Δ_t = 0: the remote's distribution passes unchanged.
* ``token``: each candidate keeps its own Δ_t(c) where Δ_t(c) ≤ −τ and takes 0
  elsewhere: q_t(c) ∝ p_t(c)^(1/T) · exp(α·Δ_t(c)·[Δ_t(c) ≤ −τ]). Only the tokens that U
  finds far less probable than B does (what the forget set taught it: −10 to −30 nats
  on a forget set's names, against −1 to −3 on unrelated prompts with the SmolLM2 pair)
  are lowered, whatever mass the remote gives them, and the rest keep the remote's
  relative probabilities. Under ``step`` a key token the remote gives 30 % stays
  when the step's expected offset is above −τ, and is sampled 30 % of the time at T = 1.
* ``choice``: ``token``, except at a step where the remote's own choice (its most likely
  candidate) has Δ_t ≤ −τ: there the whole Δ_t applies, the paper's rule exactly. Under
  ``token`` a lowered choice survives unless its offset exceeds its lead over the
  runner-up, since the candidates U raises keep the remote's scores: "… is called" →
  " Hog" (ℓ −0.03, Δ −3.7) still beat " W" (ℓ −4.5, Δ +2.1) at τ = 1.9, where U's own
  choice was " the". Out of scope the remote's choice is rarely lowered by τ, so the
  rule's extra reach is where the offset already bites.

:func:`flip_margin` gives, for one step, the largest τ at which the offset still
changes the greedy token under either rule, which calibrates τ
(:mod:`proxy.decoding.threshold`).
"""

from __future__ import annotations

import numpy as np

from proxy.common.literals import ScopeRule


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


def scoped_offset(
    remote_logprobs: np.ndarray, delta: np.ndarray, threshold: float | None, scope: ScopeRule = "step"
) -> np.ndarray:
    """Δ as scope threshold ``threshold`` (τ ≥ 0, nats; None: Δ as it is) under rule ``scope``
    leaves it, ``[k]`` float64 (module docstring): ``step``, Δ or zeros; ``token``, Δ where
    Δ ≤ −τ and 0 elsewhere; ``choice``, Δ where the remote's most likely candidate (the
    largest finite ``remote_logprobs``) has Δ ≤ −τ, else as ``token``."""
    d = np.asarray(delta, dtype=np.float64)
    if threshold is None:
        return d
    if scope in ("token", "choice"):  # a NaN offset stays, so that its candidate stays unusable (module docstring)
        with np.errstate(invalid="ignore"):
            if scope == "choice" and choice_lowered(remote_logprobs, d, threshold):
                return d  # the remote's own choice is lowered by at least τ: the whole offset
            return np.where(np.isnan(d) | (d <= -threshold), d, 0.0)
    return d if scope_score(remote_logprobs, d) <= -threshold else np.zeros_like(d)


def choice_lowered(remote_logprobs: np.ndarray, delta: np.ndarray, threshold: float) -> bool:
    """Whether the remote's most likely candidate has Δ ≤ −τ (rule ``choice``)."""
    ell = np.asarray(remote_logprobs, dtype=np.float64)
    finite = np.isfinite(ell)
    if not finite.any():
        return False
    return bool(delta[int(np.argmax(np.where(finite, ell, -np.inf)))] <= -threshold)


def flip_margin(remote_logprobs: np.ndarray, delta: np.ndarray, alpha: float, scope: ScopeRule = "step") -> float:
    """The largest τ (nats) at which α·Δ, under rule ``scope``, still changes the step's greedy
    token (the remote's argmax); 0 when no τ does. A τ above it keeps the step's token.

    ``step``: −s_t when the unthresholded offset changes the argmax. ``token`` and ``choice``:
    the largest of the candidates' −Δ at which the offset kept changes it (the offsets kept
    grow as τ falls, and may lower the competitors too, so the largest one is searched; what
    ``choice`` keeps changes at the same values)."""
    ell = np.asarray(remote_logprobs, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    if not np.isfinite(ell).any():
        return 0.0
    top = int(np.argmax(ell))

    def flips(tau: float | None) -> bool:
        scores = target_logits(ell, d, temperature=0.0, alpha=alpha, threshold=tau, scope=scope)
        return bool(np.isfinite(scores).any()) and int(np.argmax(scores)) != top

    if scope == "step":  # a step whose s_t is above 0 is out of scope at any τ ≥ 0
        return max(-scope_score(ell, d), 0.0) if flips(None) else 0.0
    with np.errstate(invalid="ignore"):
        cuts = np.unique(-d[np.isfinite(d) & (d < 0)])[::-1]  # candidate τ values, largest first
    for tau in cuts:
        if flips(float(tau)):
            return float(tau)
    return 0.0


def target_logits(
    remote_logprobs: np.ndarray,
    delta: np.ndarray,
    *,
    temperature: float,
    alpha: float,
    threshold: float | None = None,
    scope: ScopeRule = "step",
) -> np.ndarray:
    """Unnormalised log q, ``[k]`` float64; ``-inf`` where a candidate is unusable.

    ``temperature == 0`` returns ℓ + α·Δ (the greedy score). ``threshold`` τ ≥ 0
    (nats) with rule ``scope``: Δ is left out of scope as :func:`scoped_offset` says
    (see the module docstring).
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
    offset = alpha * scoped_offset(ell, d, threshold, scope) if alpha != 0 else np.zeros_like(d)
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
    scope: ScopeRule = "step",
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
      vocabulary that is −KL(P_B ‖ P_U)) is above −τ (rule ``step``), or when no candidate
      has Δ ≤ −τ (rules ``token`` and ``choice``): 1.0, as q = p there;
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
    if threshold is not None:
        delta = scoped_offset(lb, delta, threshold, scope)
        if not np.any(delta):
            return 1.0
    scores = target_logits(lb, delta, temperature=temperature, alpha=alpha)
    if temperature == 0:
        return float(int(np.argmax(scores)) == int(np.argmax(lb)))
    if top_k_drafts:
        p = np.exp(log_softmax(lb))
    return float(np.minimum(p, np.exp(log_softmax(scores))).sum())
