"""proxy.evaluation.metrics against hand-computed values on tiny inputs, and the KS,
harmonic-mean and AUC plumbing against scipy's own routines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from proxy.evaluation import metrics as M


def test_rouge_l_recall_by_hand() -> None:
    # LCS of "the cat sat" in "the big cat sat down" is 3 of the reference's 3 words.
    assert M.rouge_l_recall("the cat sat", "the big cat sat down") == 1.0
    # reference 4 words, LCS "the cat" = 2 -> 0.5
    assert M.rouge_l_recall("the cat was hungry", "the cat") == 0.5
    assert M.rouge_l_recall("Lisbon", "I do not know.") == 0.0


def test_probability_and_avg_loss_by_hand() -> None:
    lp = [math.log(0.5), math.log(0.125)]  # mean = log(0.25)
    assert M.avg_loss(lp) == pytest.approx(-math.log(0.25))
    assert M.probability(lp) == pytest.approx(0.25)


def test_probability_with_options_by_hand() -> None:
    correct = [math.log(0.6)]
    wrong = [[math.log(0.2)], [math.log(0.1), math.log(0.1)]]
    # 0.6 / (0.6 + 0.2 + 0.1)
    assert M.probability_with_options(correct, wrong) == pytest.approx(0.6 / 0.9)


def test_truth_ratio_by_hand() -> None:
    para = [math.log(0.5)] * 3  # normalised prob 0.5
    # perturbed avg losses -log 0.1 and -log 0.4: exp(-mean) = sqrt(0.04) = 0.2
    pert = [[math.log(0.1)], [math.log(0.4), math.log(0.4)]]
    tr = M.truth_ratio(para, pert)
    assert tr == pytest.approx(0.2 / 0.5)
    assert M.truth_ratio_closer_to_1([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert M.truth_ratio_true_better([0.25, 1.5]) == pytest.approx((0.75 + 0.0) / 2)


def test_forget_quality_is_scipy_ks() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.5, 1, 40)
    fq = M.forget_quality(a, b)
    r = scipy.stats.ks_2samp(a, b)
    assert (fq.pvalue, fq.statistic, fq.n, fq.n_reference) == (
        pytest.approx(r.pvalue),
        pytest.approx(r.statistic),
        40,
        40,
    )
    # identical samples: statistic 0, p-value 1
    same = M.forget_quality([0.2, 0.4, 0.9], [0.2, 0.4, 0.9])
    assert same.statistic == 0.0 and same.pvalue == pytest.approx(1.0)
    # disjoint samples of 3: statistic 1, exact two-sided p = 2 / C(6, 3) = 0.1
    apart = M.forget_quality([0.1, 0.2, 0.3], [1.1, 1.2, 1.3])
    assert apart.statistic == 1.0 and apart.pvalue == pytest.approx(0.1)


def test_model_utility_is_harmonic_mean() -> None:
    v = [0.9, 0.5, 0.25]
    assert M.model_utility(v) == pytest.approx(3 / (1 / 0.9 + 1 / 0.5 + 1 / 0.25))
    assert M.model_utility(v) == pytest.approx(scipy.stats.hmean(v))
    assert M.model_utility([0.7, 0.0]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([1.5])
    with pytest.raises(ValueError):
        M.model_utility([])


def test_min_k_score_by_hand() -> None:
    lp = [-0.1, -3.0, -0.5, -2.0, -0.2]
    # k = 0.4 of 5 tokens = 2 lowest: -3.0, -2.0 -> score 2.5
    assert M.min_k_score(lp, 0.4) == pytest.approx(2.5)
    # one token: at least one kept
    assert M.min_k_score([-0.7], 0.4) == pytest.approx(0.7)


def test_mia_auc_by_hand_and_against_roc() -> None:
    # holdout scored higher (less likely) than every forget item: AUC 1
    assert M.mia_auc([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert M.mia_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    # pairs (h > f): (0.3>0.2) yes, (0.3>0.4) no, (0.4 tie 0.4) half, (0.4>0.2) yes -> 2.5 / 4
    assert M.mia_auc([0.2, 0.4], [0.3, 0.4]) == pytest.approx(0.625)
    # against the trapezoidal ROC area computed from scratch
    rng = np.random.default_rng(1)
    f, h = rng.normal(0, 1, 30), rng.normal(0.7, 1, 25)
    scores, labels = np.r_[f, h], np.r_[np.zeros(30), np.ones(25)]
    order = np.argsort(-scores)
    tpr = np.r_[0, np.cumsum(labels[order]) / 25]
    fpr = np.r_[0, np.cumsum(1 - labels[order]) / 30]
    assert M.mia_auc(f, h) == pytest.approx(np.trapezoid(tpr, fpr))


def test_key_spans_on_word_boundaries() -> None:
    assert M.contains_span("She has published 5 novels.", ["5"])
    assert not M.contains_span("She has published 15 novels.", ["5"])
    assert M.contains_span('Her debut was "the silent harbor".', ["The Silent Harbor"])
    assert M.leak_rate(["born in Lisbon", "born in Porto", "I don't know", "LISBON!"], ["Lisbon"]) == 0.5
    assert M.extraction_prefix("X was born in 1963.", "1963") == "X was born in "
    assert M.extraction_prefix("X was born in 1963.", "1964") is None


def test_bad_logprobs_are_refused() -> None:
    with pytest.raises(ValueError):
        M.probability([])
    with pytest.raises(ValueError):
        M.probability([0.5])
    with pytest.raises(ValueError):
        M.truth_ratio([-1.0], [])
