import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from duet_jax import metrics
from tests import tolerances as tol

# The metrics run in float64 on the host; both they and sklearn are sums of at most a few
# hundred terms of size <= 1 (rank sums, trapezoids, per-user means), so they agree to
# tol.f64_atol(2 n) ~ 1e-13; pytest.approx's default (relative 1e-6) is far above that.


def test_auc_equals_sklearn_with_ties(rng):
    for _ in range(50):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        want = roc_auc_score(labels, scores)
        assert metrics.auc(labels, scores) == pytest.approx(want, abs=tol.f64_atol(2 * n))


def test_user_auc_groups_by_id_not_by_consecutive_rows(rng):
    users = np.array([7, 3, 7, 3, 7, 3, 9, 9])  # interleaved rows; user 9 has one label only
    labels = np.array([1, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.9, 0.2, 0.5, 0.1, 0.3, 0.8, 0.4, 0.6])
    want = np.mean([roc_auc_score(labels[users == u], scores[users == u]) for u in (7, 3)])
    assert metrics.user_auc(users, labels, scores) == pytest.approx(want)


def test_user_auc_equals_mean_of_sklearn_per_user(rng):
    users = rng.integers(0, 12, 400)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400), 1)
    per_user = [
        roc_auc_score(labels[users == u], scores[users == u])
        for u in np.unique(users)
        if len(set(labels[users == u])) == 2
    ]
    assert metrics.user_auc(users, labels, scores) == pytest.approx(
        np.mean(per_user), abs=tol.f64_atol(2 * len(users))
    )


def test_logloss_equals_sklearn(rng):
    labels = rng.integers(0, 2, 100)
    logits = rng.normal(scale=3, size=100)
    want = log_loss(labels, 1 / (1 + np.exp(-logits)))
    # sklearn goes through p = sigmoid(x) and log(1 - p): 1 - p cancels, costing a relative
    # U64 * e^|x| <= 1e-16 * e^12 ~ 2e-11 (|x| < 12 for these 100 draws at scale 3)
    assert np.abs(logits).max() < 12
    assert metrics.logloss(labels, logits) == pytest.approx(want, rel=1e-9)


def test_logloss_is_finite_for_extreme_logits():
    # log(1 + e^-200) ~ 1e-87: zero to any tolerance; 800 + log(1 + e^-800) rounds to 800
    assert metrics.logloss([1, 0], [200.0, -200.0]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.logloss([0], [800.0]) == pytest.approx(800.0)


def test_ndcg_hr_hand_computed():
    # user 1: ranking by score is neg(0.9), pos(0.5), neg(0.2), pos(0.1)
    # user 2: pos(0.8), neg(0.3); user 3 has no negative and is left out
    users = [1, 1, 1, 1, 2, 2, 3]
    labels = [1, 0, 0, 1, 1, 0, 1]
    scores = [0.5, 0.2, 0.9, 0.1, 0.8, 0.3, 0.7]
    got = metrics.ranking_metrics(users, labels, scores, ks=(1, 2, 4))
    d = lambda r: 1 / math.log2(r + 1)
    ndcg_u1 = {1: 0.0, 2: d(2) / (d(1) + d(2)), 4: (d(2) + d(4)) / (d(1) + d(2))}
    hr_u1 = {1: 0.0, 2: 1 / 2, 4: 2 / 2}
    for k in (1, 2, 4):
        assert got[f"ndcg@{k}"] == pytest.approx((ndcg_u1[k] + 1.0) / 2)
        assert got[f"hr@{k}"] == pytest.approx((hr_u1[k] + 1.0) / 2)


def test_ties_rank_positives_pessimistically():
    got = metrics.ranking_metrics([0, 0, 0], [1, 0, 0], [0.5, 0.5, 0.5], ks=(1,))
    assert got["hr@1"] == 0.0 and got["ndcg@1"] == 0.0


def test_perfect_ranking_scores_one():
    users = np.repeat(np.arange(5), 10)
    labels = np.tile([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], 5)
    scores = labels + 0.01 * np.arange(50)
    result = metrics.evaluate(users, labels, np.log(scores + 1e-3))
    for name in ("auc", "uauc", "ndcg@5", "hr@5", "ndcg@10", "hr@20"):
        assert result[name] == pytest.approx(1.0)


def test_single_class_gives_nan_not_error():
    assert math.isnan(metrics.auc([1, 1], [0.1, 0.2]))
    assert math.isnan(metrics.user_auc([0, 0], [1, 1], [0.1, 0.2]))


@pytest.mark.parametrize(
    "labels,scores,match",
    [
        ([1, 0], [0.1, float("nan")], "score at index 1"),
        ([1, 2], [0.1, 0.2], "label at index 1"),
        ([1, 0, 1], [0.1, 0.2], "differ in length"),
    ],
)
def test_bad_inputs_name_the_problem(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate(np.zeros(len(labels)), labels, scores)
