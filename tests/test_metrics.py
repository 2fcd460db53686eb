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


def test_ndcg_hr_recall_hand_computed():
    # user 1: ranking by score is neg(0.9), pos(0.5), neg(0.2), pos(0.1)
    # user 2: pos(0.8), neg(0.3); user 3 has no negative and is left out
    users = [1, 1, 1, 1, 2, 2, 3]
    labels = [1, 0, 0, 1, 1, 0, 1]
    scores = [0.5, 0.2, 0.9, 0.1, 0.8, 0.3, 0.7]
    got = metrics.ranking_metrics(users, labels, scores, ks=(1, 2, 4))
    d = lambda r: 1 / math.log2(r + 1)
    ndcg_u1 = {1: 0.0, 2: d(2) / (d(1) + d(2)), 4: (d(2) + d(4)) / (d(1) + d(2))}
    hr_u1 = {1: 0.0, 2: 1.0, 4: 1.0}
    recall_u1 = {1: 0.0, 2: 1 / 2, 4: 2 / 2}
    for k in (1, 2, 4):
        # a handful of float64 logs and divisions: far inside tol.f64_atol(16) ~ 4e-15
        assert got[f"ndcg@{k}"] == pytest.approx((ndcg_u1[k] + 1.0) / 2, abs=tol.f64_atol(16))
        # ratios of small integers with power-of-two denominators (hits / min(K, P) in
        # {0, 1/2, 1}, then a mean over 2 lists): float64 holds them and every partial sum
        # exactly, so the comparison is exact
        assert got[f"hr@{k}"] == (hr_u1[k] + 1.0) / 2
        assert got[f"recall@{k}"] == (recall_u1[k] + 1.0) / 2


# Four lists (users 10, 3, 7, 0) in interleaved rows with non-consecutive ids, plus user 5
# (positives only) and user 8 (negatives only), which have no ranking metric. Ranked by score,
# pessimistic ties (a positive below every negative it ties with):
#   user 10, P=2: pos .9, neg .8, neg .7, pos .7 (ties the neg), neg .1 -> positives at 1, 4
#   user  3, P=1: neg .5, neg .5, pos .5 (all tied)                     -> positive at 3
#   user  7, P=4: pos .6, pos .4, neg .3, pos .2, pos .2                -> positives at 1, 2, 4, 5
#   user  0, P=1: neg .9, .8, .7, .6, pos .5                            -> positive at 5
HAND_ROWS = [  # (user, label, score)
    (10, 1, 0.9), (3, 0, 0.5), (7, 1, 0.6), (0, 0, 0.9), (5, 1, 0.3), (10, 0, 0.8),
    (3, 1, 0.5), (7, 1, 0.4), (0, 0, 0.8), (8, 0, 0.2), (10, 0, 0.7), (3, 0, 0.5),
    (7, 0, 0.3), (0, 0, 0.7), (10, 1, 0.7), (7, 1, 0.2), (0, 0, 0.6), (10, 0, 0.1),
    (7, 1, 0.2), (0, 1, 0.5), (5, 1, 0.9),
]
POSITIVE_RANKS = {10: (1, 4), 3: (3,), 7: (1, 2, 4, 5), 0: (5,)}


def test_hr_and_recall_on_hand_ranked_lists():
    users, labels, scores = map(np.array, zip(*HAND_ROWS, strict=True))
    got = metrics.ranking_metrics(users, labels, scores, ks=(1, 2, 4, 5))
    # hits@K per list (10, 3, 7, 0) and P (2, 1, 4, 1):
    #   K=1: 1, 0, 1, 0   K=2: 1, 0, 2, 0   K=4: 2, 1, 3, 0   K=5: 2, 1, 4, 1
    # hr@K = mean 1[hits >= 1]; recall@K = mean hits / min(K, P). All are ratios of small
    # integers with power-of-two denominators (4 lists; min(K, P) in {1, 2, 4}), which
    # float64 holds, with every partial sum, exactly: compared with ==.
    want_hr = {1: 2 / 4, 2: 2 / 4, 4: 3 / 4, 5: 4 / 4}
    want_recall = {
        1: (1 + 0 + 1 + 0) / 4,
        2: (1 / 2 + 0 + 2 / 2 + 0) / 4,  # 3/8: below hr@2, user 10 has one of two on top
        4: (2 / 2 + 1 + 3 / 4 + 0) / 4,  # 11/16
        5: (2 / 2 + 1 + 4 / 4 + 1) / 4,
    }
    for k in (1, 2, 4, 5):
        assert got[f"hr@{k}"] == want_hr[k], k
        assert got[f"recall@{k}"] == want_recall[k], k
    # ndcg from the same positive ranks; float64 logs: tol.f64_atol(32) ~ 7e-15 covers the
    # few dozen roundings of these sums and quotients of terms <= 1
    d = lambda r: 1 / math.log2(r + 1)
    for k in (1, 2, 4, 5):
        per_list = [
            sum(d(r) for r in ranks if r <= k) / sum(d(r) for r in range(1, min(k, len(ranks)) + 1))
            for ranks in POSITIVE_RANKS.values()
        ]
        assert got[f"ndcg@{k}"] == pytest.approx(np.mean(per_list), abs=tol.f64_atol(32))


def test_per_user_values_in_ascending_user_order():
    users, labels, scores = map(np.array, zip(*HAND_ROWS, strict=True))
    ids, values, has_both = metrics.per_user(users, labels, scores, "recall@4")
    assert ids.tolist() == [0, 3, 5, 7, 8, 10]
    assert has_both.tolist() == [True, True, False, True, False, True]
    assert values[has_both].tolist() == [0.0, 1.0, 3 / 4, 1.0]  # exact, as above
    assert np.isnan(values[~has_both]).all()
    _, hr, _ = metrics.per_user(users, labels, scores, "hr@2")
    assert hr[has_both].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'auc' has no per-user value"):
        metrics.per_user(users, labels, scores, "auc")


def test_hr_is_one_when_a_list_has_fewer_than_k_negatives():
    # one positive ranked last among 4 negatives: hr@5 counts it, hr@4 does not
    got = metrics.ranking_metrics([0] * 5, [0, 0, 0, 0, 1], [5, 4, 3, 2, 1], ks=(4, 5))
    assert (got["hr@4"], got["hr@5"], got["recall@5"]) == (0.0, 1.0, 1.0)


def _reference_ranking(users, labels, scores, k):
    """Per-list loops: sort each list by (-score, label) (pessimistic ties)."""
    hr, recall, ndcg = [], [], []
    for u in np.unique(users):
        y, s = labels[users == u], scores[users == u]
        if y.min() == y.max():
            continue
        ranked = [label for _, label in sorted(zip(-s, y, strict=True))]
        hits = sum(ranked[:k])
        hr.append(float(hits >= 1))
        recall.append(hits / min(k, sum(ranked)))
        dcg = sum(1 / math.log2(r + 2) for r, label in enumerate(ranked[:k]) if label)
        ndcg.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(k, sum(ranked)))))
    return np.mean(ndcg), np.mean(hr), np.mean(recall)


def test_ranking_metrics_equal_per_list_loops(rng):
    users = rng.integers(0, 15, 300)
    labels = (rng.random(300) < 0.3).astype(int)
    scores = np.round(rng.normal(size=300), 1)  # rounding makes ties
    for k in (1, 3, 10):
        got = metrics.ranking_metrics(users, labels, scores, ks=(k,))
        want = _reference_ranking(users, labels, scores, k)
        # means over 15 lists of values <= 1, each from <= 2k + 2 float64 roundings
        atol = tol.f64_atol(2 * 10 + 2 + 15)
        for name, value in zip(("ndcg", "hr", "recall"), want, strict=True):
            assert got[f"{name}@{k}"] == pytest.approx(value, abs=atol), (name, k)


def test_metric_names_order_and_evaluate_keys(rng):
    assert metrics.METRIC_NAMES[:9] == (
        "auc", "uauc", "logloss", "ndcg@5", "hr@5", "recall@5", "ndcg@10", "hr@10", "recall@10"
    )
    assert metrics.METRIC_NAMES[9:] == ("ndcg@20", "hr@20", "recall@20")
    result = metrics.evaluate(rng.integers(0, 3, 30), rng.integers(0, 2, 30), rng.normal(size=30))
    assert tuple(result) == metrics.METRIC_NAMES


def test_ties_rank_positives_pessimistically():
    got = metrics.ranking_metrics([0, 0, 0], [1, 0, 0], [0.5, 0.5, 0.5], ks=(1,))
    assert got["hr@1"] == 0.0 and got["ndcg@1"] == 0.0 and got["recall@1"] == 0.0


def test_perfect_ranking_scores_one():
    users = np.repeat(np.arange(5), 10)
    labels = np.tile([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], 5)
    scores = labels + 0.01 * np.arange(50)
    result = metrics.evaluate(users, labels, np.log(scores + 1e-3))
    for name in ("auc", "uauc", "ndcg@5", "hr@5", "recall@5", "ndcg@10", "hr@20", "recall@20"):
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
