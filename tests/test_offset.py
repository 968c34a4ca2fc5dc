"""The offset math (proxy.decoding.offset): properties on seeded random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.decoding.offset import (
    NoUsableCandidates,
    apply_top_p,
    choose,
    flip_margin,
    log_softmax,
    predicted_acceptance,
    scope_score,
    scoped_offset,
    target_logits,
)

logprob_lists = st.lists(st.floats(-30, 0), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(logprob_lists, st.floats(0.05, 2.0), st.floats(-5, 5), st.integers(0, 2**31))
def test_q_is_a_distribution(ell, temperature, alpha, seed):
    rng = np.random.default_rng(seed)
    delta = rng.normal(size=len(ell)) * 3
    logq = log_softmax(target_logits(np.array(ell), delta, temperature=temperature, alpha=alpha))
    assert np.all(np.isfinite(logq))
    assert np.exp(logq).sum() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(logprob_lists, st.integers(0, 2**31))
def test_alpha_zero_is_identity(ell, seed):
    delta = np.random.default_rng(seed).normal(size=len(ell)) * 10
    delta[0] = np.inf  # even a non-finite Δ is ignored at α = 0
    got = log_softmax(target_logits(np.array(ell), delta, temperature=1.0, alpha=0.0))
    assert np.allclose(got, log_softmax(np.array(ell)), atol=1e-12)


def test_formula_by_hand():
    ell = np.log(np.array([0.5, 0.3, 0.2]))
    delta = np.array([-2.0, 0.0, 1.0])
    q = np.exp(log_softmax(target_logits(ell, delta, temperature=0.5, alpha=1.5)))
    raw = np.array([0.5, 0.3, 0.2]) ** 2 * np.exp(1.5 * delta)
    assert np.allclose(q, raw / raw.sum(), atol=1e-12)


def test_non_finite_candidates_get_zero_and_all_bad_raises():
    ell = np.array([-np.inf, -0.5, np.nan])
    q = np.exp(log_softmax(target_logits(ell, np.zeros(3), temperature=1.0, alpha=1.0)))
    assert q.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(NoUsableCandidates):
        log_softmax(target_logits(np.array([-np.inf, np.nan]), np.zeros(2), temperature=1.0, alpha=1.0))


def test_greedy_is_argmax_of_ell_plus_alpha_delta():
    ell = np.log(np.array([0.6, 0.4]))
    idx, _ = choose(
        target_logits(ell, np.array([-1.0, 0.0]), temperature=0, alpha=1.0),
        temperature=0,
        top_p=1.0,
        rng=np.random.default_rng(0),
    )
    assert idx == 1


def test_top_p_keeps_smallest_nucleus():
    logq = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    kept = np.exp(apply_top_p(logq, 0.8))
    assert np.allclose(kept, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert np.allclose(np.exp(apply_top_p(logq, 0.81)), np.array([0.5, 0.3, 0.15, 0]) / 0.95)


def test_scope_score_is_the_expected_offset_under_the_remotes_distribution():
    ell = np.log(np.array([0.5, 0.3, 0.2])) - 0.7  # unnormalised over the candidates: renormalised
    delta = np.array([-2.0, 1.0, 0.5])
    assert scope_score(ell, delta) == pytest.approx(0.5 * -2.0 + 0.3 * 1.0 + 0.2 * 0.5)
    assert scope_score(ell, np.array([-np.inf, 0.0, 0.0])) == -np.inf  # unrepresentable bytes with mass
    assert scope_score(np.array([0.0, -np.inf]), np.array([0.0, -np.inf])) == 0.0  # no mass, no effect


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_threshold_passes_out_of_scope_steps_unchanged(temperature):
    ell = np.log(np.array([0.40, 0.38, 0.22]))
    small = np.array([-0.05, 0.10, 0.0])  # a near-tie the bare offset would flip
    scale = 1.0 if temperature == 0 else 1 / temperature

    def same_q(scores, expected):  # target_logits is log q up to a constant
        return np.allclose(log_softmax(scores), log_softmax(expected), rtol=0, atol=1e-12)

    bare = target_logits(ell, small, temperature=temperature, alpha=1.0)
    assert np.argmax(bare) == 1 and same_q(bare, ell * scale + small)
    gated = target_logits(ell, small, temperature=temperature, alpha=1.0, threshold=0.5)
    assert same_q(gated, ell * scale)  # the remote's distribution
    fact = np.array([-6.0, 0.2, 0.1])  # the offset objects to the remote's likely answer: in scope
    assert scope_score(ell, fact) < -0.5
    gated = target_logits(ell, fact, temperature=temperature, alpha=1.0, threshold=0.5)
    assert same_q(gated, ell * scale + fact)
    with pytest.raises(ValueError):
        target_logits(ell, fact, temperature=temperature, alpha=1.0, threshold=-1.0)


@pytest.mark.parametrize("temperature", [1e-10, 1e-300, 5e-324])
def test_a_tiny_temperature_is_nearly_greedy_not_unusable(temperature):
    """1/T overflows for T near 0: q must still be the argmax of ℓ, never 'no usable candidate'."""
    ell = np.array([-2.3, -0.1, 0.0 - 0.05, -np.inf])
    scores = target_logits(ell, np.array([0.0, 0.3, 0.0, 0.0]), temperature=temperature, alpha=1.0)
    logq = log_softmax(scores)
    assert int(np.argmax(logq)) == 2 and np.exp(logq[2]) == pytest.approx(1.0)
    idx, _ = choose(scores, temperature=temperature, top_p=1.0, rng=np.random.default_rng(0))
    assert idx == 2


def test_predicted_acceptance_by_hand():
    """B stands in for the remote: p = P_B, q ∝ P_B^(1/T)·exp(α·(log P_U − log P_B))."""
    lb = np.log(np.array([0.6, 0.3, 0.1]))
    lu = np.log(np.array([0.1, 0.6, 0.3]))
    kw = dict(alpha=1.0, temperature=1.0)
    # T = 1, α = 1: q = P_U, so the rate is Σ min(P_B, P_U) = 0.1 + 0.3 + 0.1.
    assert predicted_acceptance(lu, lb, **kw) == pytest.approx(0.5)
    # α = 0.5: q ∝ sqrt(P_B·P_U).
    q = np.sqrt(np.exp(lb) * np.exp(lu))
    q /= q.sum()
    assert predicted_acceptance(lu, lb, alpha=0.5, temperature=1.0) == pytest.approx(np.minimum(np.exp(lb), q).sum())
    # Greedy: argmax of P_U differs from argmax of P_B.
    assert predicted_acceptance(lu, lb, alpha=1.0, temperature=0.0) == 0.0
    assert predicted_acceptance(lb, lb, alpha=1.0, temperature=0.0) == 1.0
    # Out of scope: −KL(P_B ‖ P_U) is above −τ.
    kl = float(np.sum(np.exp(lb) * (lb - lu)))
    assert predicted_acceptance(lu, lb, **kw, threshold=kl + 0.01) == 1.0
    assert predicted_acceptance(lu, lb, **kw, threshold=kl - 0.01) == pytest.approx(0.5)
    assert predicted_acceptance(lu, lb, alpha=0.0, temperature=1.0) == 1.0
    # S = B's top 2 (the remote's S_t): q over S only; p is P_B (whole-vocabulary drafts)
    # or P_B renormalised over S (top-k drafts).
    lb4 = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    lu4 = np.log(np.array([0.3, 0.5, 0.15, 0.05]))
    q = np.array([0.3, 0.5]) / 0.8  # α = 1, T = 1: q ∝ P_U over S
    assert predicted_acceptance(lu4, lb4, **kw, top_k=2) == pytest.approx(np.minimum([0.5, 0.3], q).sum())
    p = np.array([0.5, 0.3]) / 0.8
    assert predicted_acceptance(lu4, lb4, **kw, top_k=2, top_k_drafts=True) == pytest.approx(np.minimum(p, q).sum())
    # Tokens B gives no mass: no Δ there, no NaN.
    lb0 = np.array([np.log(0.7), np.log(0.3), -np.inf])
    assert predicted_acceptance(np.log([0.5, 0.25, 0.25]), lb0, **kw) == pytest.approx(2 / 3 + 0.3)


def test_the_token_rule_keeps_only_offsets_at_most_minus_tau_by_hand():
    ell, delta = np.log([0.6, 0.3, 0.1]), np.array([-3.0, -0.5, 0.2])
    assert scoped_offset(ell, delta, 1.0, "token").tolist() == [-3.0, 0.0, 0.0]
    assert scoped_offset(ell, delta, None, "token").tolist() == delta.tolist()  # no τ: Δ as it is
    for scope in ("step", "token", "choice"):  # a non-finite offset leaves its candidate unusable under any rule
        bad = target_logits(
            ell, np.array([np.nan, -0.5, -np.inf]), temperature=1.0, alpha=1.0, threshold=1.0, scope=scope
        )
        assert bad[0] == -np.inf and bad[2] == -np.inf and np.isfinite(bad[1])
    # step: s = 0.6·(−3) + 0.3·(−0.5) + 0.1·0.2 = −1.93
    assert scoped_offset(ell, delta, 1.0, "step").tolist() == delta.tolist()
    assert scoped_offset(ell, delta, 2.0, "step").tolist() == [0.0, 0.0, 0.0]
    got = log_softmax(target_logits(ell, delta, temperature=1.0, alpha=1.0, threshold=1.0, scope="token"))
    want = np.log(np.array([0.6 * np.exp(-3.0), 0.3, 0.1]) / (0.6 * np.exp(-3.0) + 0.4))
    assert np.allclose(got, want)
    # a candidate with a large offset is lowered whatever mass the remote gives it; the step rule
    # leaves the same step alone when the mean offset is above −τ
    ell2, delta2 = np.log([0.2, 0.8]), np.array([-8.0, 0.0])  # s = −1.6
    tok = log_softmax(target_logits(ell2, delta2, temperature=1.0, alpha=1.0, threshold=2.0, scope="token"))
    step = log_softmax(target_logits(ell2, delta2, temperature=1.0, alpha=1.0, threshold=2.0, scope="step"))
    assert np.exp(tok[0]) < 1e-3 and np.isclose(np.exp(step[0]), 0.2)


def test_the_choice_rule_applies_the_whole_offset_where_the_remotes_choice_is_lowered_by_tau():
    """``choice``: ``token``, except at a step whose most likely candidate has Δ ≤ −τ, which
    keeps its whole Δ (the paper's rule there), so that what U raises can replace it."""
    # the demo's "… is called": " Hog" lowered by 3.7 still beats " W" under token at τ = 1.9
    ell, delta = np.array([-0.03, -4.53, -5.74]), np.array([-3.72, 2.11, 2.19])
    tok = target_logits(ell, delta, temperature=0.0, alpha=1.0, threshold=1.9, scope="token")
    cho = target_logits(ell, delta, temperature=0.0, alpha=1.0, threshold=1.9, scope="choice")
    assert int(np.argmax(tok)) == 0 and int(np.argmax(cho)) == 1
    assert scoped_offset(ell, delta, 1.9, "choice").tolist() == delta.tolist()
    # the choice not lowered by τ: exactly the token rule (the lowered runner-up alone)
    d2 = np.array([-1.0, -3.0, 2.0])
    assert scoped_offset(ell, d2, 1.9, "choice").tolist() == [0.0, -3.0, 0.0]
    assert scoped_offset(ell, d2, None, "choice").tolist() == d2.tolist()
    # the choice is the finite maximum, wherever it is
    assert scoped_offset(np.array([-np.inf, -2.0, -0.5]), np.array([5.0, 1.0, -2.0]), 1.0, "choice").tolist() == [
        5.0,
        1.0,
        -2.0,
    ]
    assert flip_margin(ell, delta, 1.0, "choice") == pytest.approx(3.72)
    assert flip_margin(ell, delta, 1.0, "token") == 0.0  # token never flips it


def test_flip_margin_is_the_largest_tau_that_still_changes_the_greedy_token():
    ell = np.log([0.5, 0.4, 0.1])
    # step rule: −s_t when the whole offset flips the argmax, else 0
    d = np.array([-3.0, -1.0, 0.0])
    assert np.isclose(flip_margin(ell, d, 1.0, "step"), -scope_score(ell, d))
    assert flip_margin(ell, np.array([-0.1, 0.0, 0.0]), 1.0, "step") == 0.0
    # token rule: τ = 3 keeps only the top's −3, which flips it
    assert flip_margin(ell, d, 1.0, "token") == 3.0
    # at τ = 3 only the runner-up is lowered (no flip); at τ = 2 the top is lowered too and
    # the third candidate wins: the search goes past the largest cut
    d2 = np.array([-2.0, -3.0, 0.0])
    assert flip_margin(ell, d2, 1.0, "token") == 2.0
    assert int(np.argmax(target_logits(ell, d2, temperature=0.0, alpha=1.0, threshold=2.5, scope="token"))) == 0
    assert int(np.argmax(target_logits(ell, d2, temperature=0.0, alpha=1.0, threshold=2.0, scope="token"))) == 2
    assert flip_margin(ell, np.array([-1.0, -2.0, 0.0]), 1.0, "token") == 0.0  # never flips


@settings(max_examples=200, deadline=None)
@given(logprob_lists, st.integers(0, 2**31), st.sampled_from(["step", "token", "choice"]))
def test_a_tau_above_the_flip_margin_keeps_the_greedy_token(ell, seed, scope):
    ell = np.array(ell)
    delta = np.random.default_rng(seed).normal(0, 3, ell.size)
    m = flip_margin(ell, delta, 1.0, scope)
    top = int(np.argmax(ell))
    for tau in (m + 1e-6, m + 1.0):
        assert int(np.argmax(target_logits(ell, delta, temperature=0.0, alpha=1.0, threshold=tau, scope=scope))) == top
    if m > 0:
        at = target_logits(ell, delta, temperature=0.0, alpha=1.0, threshold=m, scope=scope)
        assert int(np.argmax(at)) != top
