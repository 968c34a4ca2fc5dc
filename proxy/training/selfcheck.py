"""What training ends with: the scope threshold τ calibrated on held-out prompts and a
self-check of the offset (no remote needed), both decoded through the local pair with B
standing in for the remote (:mod:`proxy.training.greedy`).

The margin of a prompt is the one of :mod:`proxy.decoding.threshold` (the largest −s_t
over the steps where α·Δ would change the greedy token, decoding with τ = ∞),
and τ is :func:`proxy.decoding.threshold.pick_threshold` over the calibration prompts'
margins. Fluency is B's mean per-token log-probability of an answer,
teacher-forced on its prompt (nats per token): the ℓ_B of each chosen token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from proxy.common.literals import ScopeRule
from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.threshold import pick_threshold
from proxy.evaluation.metrics import rouge_l_recall
from proxy.training.data import Example
from proxy.training.facts import fact_words, words_of
from proxy.training.greedy import Decoded, PairModels, base_decode, greedy_decode


def calibrate_and_check(
    pair: PairModels,
    *,
    gate: ScopeGate | None = None,
    forget: Sequence[Example],
    calibration: Sequence[Example],
    check: Sequence[Example],
    neighbours: Sequence[Example] = (),
    forget_guesses: Sequence[str | None] | None = None,
    tau_through_gate: bool = False,
    alpha: float = 1.0,
    unchanged: float = 0.95,
    max_tokens: int = 40,
    scope: ScopeRule = "step",
    common_words: Collection[str] = (),
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """τ under rule ``scope`` (:mod:`proxy.decoding.offset`) from ``calibration``'s margins
    (the smallest that keeps ``unchanged`` of their greedy answers exactly B's), then the
    self-check at that τ: forget-set ROUGE-L recall with and without the offset, and, with
    ``common_words`` (the broad retain set's, :func:`proxy.training.facts.lower_case_words`),
    the forget answers' fact-word recall (the share of each answer's fact words,
    :func:`proxy.training.facts.fact_words` with the forget set's ``names``, that the greedy
    answer holds; mean over the answers that have one), the fraction of held-out ``check`` and ``neighbours``
    answers unchanged, and B's per-token log-probability of the forget answers with the
    offset against B's own answers (fluency, nats per token). ``forget_guesses`` (one per
    chat forget example, or None) guess B's own answers to the forget questions, as the
    held-out examples' targets do: a guess is checked step by step, never trusted. ``ok`` is false with a
    ``warnings`` entry for each check that failed (limits in :data:`SELF_CHECK_LIMITS`).
    With a scope ``gate`` (:mod:`proxy.decoding.scope_gate`), everything is decoded through
    it, as ``serve`` decodes, τ included (``unchanged`` of the calibration answers kept by
    the gate and τ together); with ``tau_through_gate`` off, τ is calibrated without it (τ
    alone keeps them: the gate and τ each guard the answers out of scope).

    Raises:
        ValueError: no calibration prompts, a chat-less (raw text) example among them, or
            ``forget_guesses`` not one per chat forget example.
    """

    def prompts(items: Sequence[Example]) -> list[Sequence[dict[str, str]]]:
        if any(e.prompt is None for e in items):
            raise ValueError("the self-check needs chat prompts (question/answer or messages examples)")
        return [e.prompt for e in items if e.prompt is not None]

    chat_forget = [e for e in forget if e.prompt is not None]
    served = pair.with_gate(gate)
    calibrated = served if tau_through_gate else pair.with_gate(None)
    cal = base_decode(
        calibrated, prompts(calibration), [e.target for e in calibration], alpha=alpha, max_tokens=max_tokens, scope=scope
    )
    tau = pick_threshold([d.margin for d in cal], unchanged)
    rest = [*check, *neighbours, *chat_forget]
    if forget_guesses is not None and len(forget_guesses) != len(chat_forget):
        raise ValueError(f"{len(forget_guesses)} guesses for {len(chat_forget)} forget questions")
    guesses: list[str | None] = [
        *(e.target for e in (*check, *neighbours)),
        *(forget_guesses if forget_guesses is not None else [None] * len(chat_forget)),
    ]
    base = [*cal, *base_decode(served, prompts(rest), guesses, alpha=alpha, max_tokens=max_tokens, scope=scope)]
    nl, nc, nn = len(calibration), len(check), len(neighbours)
    # A greedy answer is kept exactly when τ exceeds its margin (proxy.decoding.threshold): the held-out
    # answers need no second decode; the forget answers are decoded again at τ.
    f_base = base[nl + nc + nn :]
    f_served = greedy_decode(
        served, prompts(chat_forget), alpha=alpha, threshold=tau, max_tokens=max_tokens, scope=scope
    )

    def kept(lo: int, hi: int) -> float | None:
        return sum(d.margin < tau for d in base[lo:hi]) / (hi - lo) if hi > lo else None

    facts = [fact_words(e, common_words, names) for e in chat_forget] if common_words else []

    def fact_recall(decoded: Sequence[Decoded]) -> float | None:
        shares = [len(f & words_of(d.text)) / len(f) for f, d in zip(facts, decoded, strict=True) if f]
        return _mean(shares)

    recall_base = [rouge_l_recall(e.target, d.text) for e, d in zip(chat_forget, f_base, strict=True)]
    recall_served = [rouge_l_recall(e.target, d.text) for e, d in zip(chat_forget, f_served, strict=True)]
    report: dict[str, Any] = {
        "offset_threshold": round(tau, 4),
        "offset_scope": scope,
        "unchanged_target": unchanged,
        "calibration_prompts": len(calibration),
        "calibration_unchanged": round(sum(d.margin < tau for d in cal) / len(cal), 4),
        "check_unchanged": _round(kept(nl, nl + nc)),
        "check_prompts": nc,
        "neighbour_unchanged": _round(kept(nl + nc, nl + nc + nn)),
        "neighbour_prompts": nn,
        "forget_prompts": len(chat_forget),
        "forget_rouge_l_recall_base": _round(_mean(recall_base)),
        "forget_rouge_l_recall_offset": _round(_mean(recall_served)),
        "forget_fact_recall_base": _round(fact_recall(f_base)) if facts else None,
        "forget_fact_recall_offset": _round(fact_recall(f_served)) if facts else None,
        "forget_changed": _round(_mean([float(s.tokens != b.tokens) for s, b in zip(f_served, f_base, strict=True)])),
        "fluency_base": _round(_mean([d.logprob for d in f_base])),
        "fluency_offset": _round(_mean([d.logprob for d in f_served])),
        "max_tokens": max_tokens,
        "scope_gate": gate is not None,
        "tau_through_gate": gate is not None and tau_through_gate,
    }
    report["warnings"] = self_check_warnings(report)
    report["ok"] = not report["warnings"]
    return report


#: What the self-check asks of an offset (docs/training.md gives the reasons).
SELF_CHECK_LIMITS = {
    "forget_recall_ratio": 0.6,  # offset recall ≤ 0.6 × B's recall (when B knows the set: recall ≥ 0.2)
    "forget_fact_recall_ratio": 0.5,  # the same for fact-word recall, where measured and B recalls some
    "check_unchanged": 0.9,  # held-out general answers kept exactly
    "neighbour_unchanged": 0.8,  # held-out neighbour answers kept exactly
    "fluency_gap": 1.0,  # nats per token below B's own answers
}


def self_check_warnings(report: dict[str, Any]) -> list[str]:
    """One sentence per failed check of a :func:`calibrate_and_check` report."""
    lim, out = SELF_CHECK_LIMITS, []
    fact_base, fact_offset = report.get("forget_fact_recall_base"), report.get("forget_fact_recall_offset")
    rb, ro = report.get("forget_rouge_l_recall_base"), report.get("forget_rouge_l_recall_offset")
    if rb is not None and ro is not None:
        # Whether B knows the set at all: ROUGE-L of whole answers (B states a fact in its own
        # words, which the user's fact words, "8,848.86 metres", rarely match exactly).
        if rb < 0.2:
            out.append(f"B barely knows the forget set (ROUGE-L recall {rb:.2f}): nothing to measure it forgets")
        elif fact_base and fact_offset is not None:  # the facts themselves: an answer may keep its form
            if fact_offset > lim["forget_fact_recall_ratio"] * fact_base:
                out.append(
                    f"the forget set is still recalled: fact-word recall {fact_offset:.2f} with the offset, "
                    f"{fact_base:.2f} without"
                )
        elif ro > lim["forget_recall_ratio"] * rb:
            out.append(f"the forget set is still recalled: ROUGE-L recall {ro:.2f} with the offset, {rb:.2f} without")
    for key in ("check_unchanged", "neighbour_unchanged"):
        value = report.get(key)
        if value is not None and value < lim[key]:
            what = "held-out general" if key == "check_unchanged" else "held-out neighbour"
            out.append(
                f"the offset leaks out of scope: {value:.0%} of {what} answers unchanged (want ≥ {lim[key]:.0%})"
            )
    fb, fo = report.get("fluency_base"), report.get("fluency_offset")
    if fb is not None and fo is not None and fb - fo > lim["fluency_gap"]:
        out.append(f"in-scope answers read badly: {fo:.2f} nats/token under B against {fb:.2f} for B's own")
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
