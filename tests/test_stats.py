import itertools

import numpy as np
import pytest

from duet_jax import metrics, stats
from tests import tolerances as tol

# AUC tolerance: metrics.auc and stats.WeightedAUC both form an exact numerator (a sum of
# half-integer ranks, or an integer count of doubled pair credits, far below 2**53) and an
# exact integer denominator, then divide once. Each result is the correctly rounded quotient
# of the same rational, so they agree to the last bit; tol.f64_atol(2) (two float64
# roundings on a value <= 1, ~4e-16) still holds if either side ever rounds once more.
AUC_ATOL = tol.f64_atol(2)


def _repeat(users, labels, scores, counts):
    """The data set with user ``u`` (ids 0..9) drawn ``counts[u]`` times: each copy a user of
    its own (id ``10 * copy + u``), so a ranking list is copied, not lengthened."""
    users, labels, scores = map(np.asarray, (users, labels, scores))
    reps = np.asarray(counts)[users]
    copy = np.concatenate([np.arange(r) for r in reps]).astype(np.int64)
    return (np.repeat(users, reps) + 10 * copy, np.repeat(labels, reps),
            np.repeat(scores, reps))


def test_weighted_auc_with_unit_weights_equals_metrics_auc(rng):
    for _ in range(30):
        n = int(rng.integers(2, 200))
        users = rng.integers(0, 7, n)
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        got = stats.WeightedAUC(users, labels, scores, 7)(np.ones((1, 7), np.int64))
        assert abs(got[0] - metrics.auc(labels, scores)) <= AUC_ATOL


def test_weighted_auc_equals_auc_of_repeated_rows(rng):
    for _ in range(30):
        n = int(rng.integers(2, 60))
        users = rng.integers(0, 5, n)
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.normal(size=n), 1)
        counts = rng.integers(0, 4, (6, 5))
        got = stats.WeightedAUC(users, labels, scores, 5)(counts)
        for c, value in zip(counts, got, strict=True):
            _, y, s = _repeat(users, labels, scores, c)
            if len(y) == 0 or y.min() == y.max():
                assert np.isnan(value)  # one class (or nothing) drawn: undefined
            else:
                assert abs(value - metrics.auc(y, s)) <= AUC_ATOL


def _a_beats_b(rng, num_users=40):
    """Per user 2 positives and 3 negatives: ``a`` ranks every positive above every
    negative (also across users); ``b`` puts one negative of each user on top."""
    users = np.repeat(np.arange(num_users), 5)
    labels = np.tile([1, 1, 0, 0, 0], num_users)
    a = 2.0 * labels + rng.uniform(0.0, 1.0, len(labels))
    b = a.copy()
    b[2::5] = 5.0  # each user's first negative
    return users, labels, a, b


@pytest.mark.parametrize(
    "metric", ["auc", "uauc", "logloss", "ndcg@2", "hr@1", "recall@2"]
)
def test_a_better_for_every_user_excludes_zero(rng, metric):
    users, labels, a, b = _a_beats_b(rng)
    out = stats.paired_bootstrap(users, labels, a, b, metric, num_resamples=300)
    better = -1.0 if metric == "logloss" else 1.0  # a's logloss is lower: diff < 0
    assert better * out["lo"] > 0 and better * out["hi"] > 0 and better * out["diff"] > 0
    # every resample has the same sign, so both tail fractions but one are 0
    assert out["p_value"] == 0.0
    assert out["num_users"] == 40 and out["num_resamples"] == 300 and out["metric"] == metric


@pytest.mark.parametrize("metric", ["auc", "uauc", "logloss", "ndcg@3", "hr@3", "recall@3"])
def test_identical_scores_give_zero(rng, metric):
    users, labels, a, _ = _a_beats_b(rng)
    out = stats.paired_bootstrap(users, labels, a, a.copy(), metric, num_resamples=100)
    # both methods go through the same operations on the same numbers: exactly 0
    assert (out["diff"], out["lo"], out["hi"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("metric", ["auc", "uauc", "logloss", "ndcg@5", "hr@5", "recall@5"])
def test_full_data_diff_equals_metrics(rng, metric):
    users = rng.integers(0, 30, 400)
    labels = (rng.random(400) < 0.3).astype(int)
    a, b = rng.normal(size=400), rng.normal(size=400)
    out = stats.paired_bootstrap(users, labels, a, b, metric, num_resamples=10)
    want = metrics.evaluate(users, labels, a)[metric] - metrics.evaluate(users, labels, b)[metric]
    # each side a float64 mean of <= 400 terms of size <= 1 (logloss: < 5 for |x| < 5 here)
    assert np.abs(np.r_[a, b]).max() < 5
    assert abs(out["diff"] - want) <= tol.f64_atol(2 * 400, scale=5.0)


def _two_users():
    """Two users, both labels each, scores such that every resample's diff differs."""
    users = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1])
    a = np.array([0.9, 0.1, 0.5, 0.4, 0.2, 0.3, 0.6, 0.1, 0.8])
    b = np.array([0.3, 0.2, 0.8, 0.1, 0.7, 0.1, 0.2, 0.3, 0.4])
    return users, labels, a, b


def _metric_of(metric, users, labels, scores):
    return metrics.evaluate(users, labels, scores, ks=(2,))[metric]


@pytest.mark.parametrize("metric", ["auc", "uauc", "logloss", "ndcg@2", "recall@2"])
def test_two_users_match_the_enumerated_resamples(metric):
    # Drawing 2 of 2 users with replacement gives counts (2, 0), (1, 1) (twice as likely:
    # either order) or (0, 2); a resample's diff is the metric on the rows repeated so.
    users, labels, a, b = _two_users()
    atoms = {}
    for c in itertools.product(range(3), repeat=2):
        if sum(c) == 2:
            ua, ya, sa = _repeat(users, labels, a, c)
            _, _, sb = _repeat(users, labels, b, c)
            atoms[c] = _metric_of(metric, ua, ya, sa) - _metric_of(metric, ua, ya, sb)
    prob = {(2, 0): 0.25, (1, 1): 0.5, (0, 2): 0.25}
    assert len(set(atoms.values())) == 3, atoms  # three distinct values

    r = 4000
    wide = stats.paired_bootstrap(users, labels, a, b, metric, num_resamples=r, level=0.95)
    narrow = stats.paired_bootstrap(users, labels, a, b, metric, num_resamples=r, level=0.2)
    # Quantiles 2.5% and 97.5% lie inside the lowest and highest atoms (each holds 1/4 of
    # the resamples), 40% and 60% inside the middle one (1/2, from 25% to 75%): with 4000
    # draws an atom's share is within 0.025 of its probability at > 3.6 standard deviations
    # (sd = sqrt(.25 * .75 / 4000) = 0.0068), and then the interpolated quantile is that
    # atom's value itself. Resampled and enumerated values may differ by the few float64
    # roundings of a weighted vs a repeated-row computation: tol.f64_atol(64, scale=5).
    atol = tol.f64_atol(64, scale=5.0)
    ordered = sorted(atoms.values())
    assert abs(wide["lo"] - ordered[0]) <= atol and abs(wide["hi"] - ordered[2]) <= atol
    assert abs(narrow["lo"] - atoms[1, 1]) <= atol and abs(narrow["hi"] - atoms[1, 1]) <= atol
    # p-value: the tail fractions estimate sums of atom probabilities; each estimate's sd is
    # at most sqrt(.25 / 4000) = 0.0079, so 2 x 5 sd = 0.08 bounds the p-value's error
    below = sum(p for c, p in prob.items() if atoms[c] <= 0)
    above = sum(p for c, p in prob.items() if atoms[c] >= 0)
    assert wide["p_value"] == pytest.approx(min(1.0, 2 * min(below, above)), abs=0.08)
    assert abs(wide["diff"] - atoms[1, 1]) <= atol  # (1, 1) is the full data


def test_same_seed_same_result_other_seed_other_draws(rng):
    users = rng.integers(0, 50, 500)
    labels = (rng.random(500) < 0.3).astype(int)
    a, b = rng.normal(size=500), rng.normal(size=500)
    first = stats.paired_bootstrap(users, labels, a, b, "auc", num_resamples=200, seed=3)
    again = stats.paired_bootstrap(users, labels, a, b, "auc", num_resamples=200, seed=3)
    other = stats.paired_bootstrap(users, labels, a, b, "auc", num_resamples=200, seed=4)
    assert first == again
    assert (other["lo"], other["hi"]) != (first["lo"], first["hi"])


def test_resample_counts_draw_every_user_with_replacement():
    chunks = list(stats.resample_counts(np.random.default_rng(0), 7, 150))
    assert [len(c) for c in chunks] == [stats.CHUNK, stats.CHUNK, 150 - 2 * stats.CHUNK]
    counts = np.concatenate(chunks)
    assert (counts.sum(axis=1) == 7).all() and counts.min() >= 0
    # a user's mean count over 150 resamples is 1 with sd sqrt(7 (1/7) (6/7) / 150) = 0.076:
    # 0.35 is 4.6 sd
    assert np.abs(counts.mean(axis=0) - 1.0).max() < 0.35


def test_bootstrap_mean_ci():
    out = stats.bootstrap_mean_ci(np.full(20, 0.25), num_resamples=50)
    assert (out["mean"], out["lo"], out["hi"], out["p_value"]) == (0.25, 0.25, 0.25, 0.0)
    # two values, 4000 draws: the means 1, 2, 3 with probabilities 1/4, 1/2, 1/4
    two = stats.bootstrap_mean_ci([1.0, 3.0], num_resamples=4000, level=0.9)
    assert (two["mean"], two["lo"], two["hi"]) == (2.0, 1.0, 3.0)  # exact: small integers
    assert two["num_users"] == 2 and two["num_resamples"] == 4000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"metric": "hr@0"}, "metric='hr@0' is invalid"),
        ({"metric": "mrr"}, "metric='mrr' is invalid"),
        ({"num_resamples": 0}, "num_resamples=0"),
        ({"level": 1.0}, "level=1.0"),
    ],
)
def test_bad_options_name_the_problem(kwargs, match):
    users, labels, a, b = _two_users()
    with pytest.raises(ValueError, match=match):
        stats.paired_bootstrap(users, labels, a, b, **kwargs)


def test_bad_rows_name_the_problem():
    users, labels, a, b = _two_users()
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_bootstrap(users, labels, a, b[:-1])
    with pytest.raises(ValueError, match="one class only"):
        stats.paired_bootstrap(users, np.ones_like(labels), a, b)
    with pytest.raises(ValueError, match="no user has both labels"):
        stats.paired_bootstrap([0, 1], [1, 0], [0.1, 0.2], [0.3, 0.4], "uauc")
