"""Paired bootstrap confidence intervals over users (host-side numpy).

Two methods scored on the SAME rows are compared by resampling users with replacement: a
resample draws as many users as there are, with equal probability, and a user drawn ``c``
times enters with all of its rows, each carrying count weight ``c`` (a multinomial weight).
Rows of one user stay together, so the correlation within a user (one history, one generated
head, candidates sharing a sequence) is kept, and both methods see the same resample, so
the noise common to both cancels in their difference.

The metric of a resample is the metric of the data set in which each drawn user appears as
many times as drawn (the weighted form of :mod:`duet_jax.metrics`):

- ``auc``: weighted Mann-Whitney AUC over all rows, ``sum_{i pos, j neg} w_i w_j
  (1[s_i > s_j] + 1/2 1[s_i = s_j]) / (sum_pos w) (sum_neg w)``;
- ``logloss``: ``sum_i w_i loss_i / sum_i w_i``;
- ``uauc``, ``ndcg@K``, ``hr@K``, ``recall@K``: ``sum_u c_u m_u / sum_u c_u``, a per-user
  value ``m_u`` (:func:`duet_jax.metrics.per_user`) weighted by the user's count. These
  metrics average over the users with both labels only, so only those users are resampled.

The interval is the percentile interval of the resampled differences; the p-value is the
two-sided bootstrap ``2 min(P*(diff <= 0), P*(diff >= 0))``, clipped to 1.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from duet_jax import metrics

# Resamples per vectorised step: the AUC step holds a few float64 [positives, CHUNK] arrays
# (2e4 x 64 x 8 B = 10 MB each for 1e5 rows), large enough to amortise numpy's overhead.
CHUNK = 64


def _check_options(num_resamples: int, level: float) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int | np.integer) \
            or num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples!r} is invalid: expected an integer >= 1")
    if not (isinstance(level, int | float) and 0.0 < level < 1.0):
        raise ValueError(f"level={level!r} is invalid: expected a number in (0, 1)")


def resample_counts(rng: np.random.Generator, num_users: int, num_resamples: int):
    """Yield int64 [chunk, num_users] multinomial counts (each row sums to ``num_users``:
    ``num_users`` draws with replacement), ``num_resamples`` rows in all, in chunks of at most
    :data:`CHUNK`. The stream depends only on ``rng``'s state and the two sizes."""
    done = 0
    while done < num_resamples:
        chunk = min(CHUNK, num_resamples - done)
        draws = rng.integers(0, num_users, size=(chunk, num_users))
        flat = (draws + num_users * np.arange(chunk)[:, None]).reshape(-1)
        yield np.bincount(flat, minlength=chunk * num_users).reshape(chunk, num_users)
        done += chunk


class WeightedAUC:
    """AUC of fixed rows under many weightings, sorting once.

    ``group`` [N] maps rows to weight slots (users) ``0..G-1`` (``G = num_groups``, default
    ``max(group) + 1``); :meth:`__call__` takes integer counts [R, G] and returns [R] AUCs
    (NaN where a weighting leaves one class only), each row weighted by its slot's count:
    ``sum_{i pos, j neg} w_i w_j (1[s_i > s_j] + 1/2 1[s_i = s_j]) / (W_pos W_neg)``.

    In ascending score order a positive's credit is the negative weight strictly below its
    tie group plus half the negative weight inside it, so only the cumulative negative weight
    at tie-group boundaries is needed: one sparse product sums each resample's negative
    weight between consecutive boundaries, and a cumulative sum over those few segments
    gives the rest. Every quantity is an integer (the numerator is doubled so half credits
    are too) held in float64, exact while ``2 W_pos W_neg < 2**53``; the only rounding is
    the final division.
    """

    def __init__(self, group: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                 num_groups: int | None = None):
        group = np.asarray(group).reshape(-1)
        labels = np.asarray(labels).reshape(-1) > 0
        scores = np.asarray(scores, np.float64).reshape(-1)
        if num_groups is None:
            num_groups = int(group.max(initial=-1)) + 1
        order = np.argsort(scores, kind="stable")
        s, y, g = scores[order], labels[order], group[order]
        n = len(s)
        new_tie = np.r_[True, s[1:] != s[:-1]] if n else np.zeros(0, bool)
        tie_first = np.flatnonzero(new_tie)
        tie_end = np.r_[tie_first[1:], n]  # one past each tie group's last row
        tie_id = np.cumsum(new_tie) - 1
        neg_before = np.r_[0, np.cumsum(~y)]  # negatives among the first k rows, k = 0..n
        pos = np.flatnonzero(y)
        below = neg_before[tie_first[tie_id[pos]]]  # negatives strictly below each positive
        upto = neg_before[tie_end[tie_id[pos]]]  # negatives below or tied
        num_neg = int(neg_before[-1])
        # Boundaries 0 = b_0 < b_1 < ... < b_K = num_neg: the negatives b_{k-1}..b_k - 1
        # (ascending order) form segment k; cumulative weight at b_k is the sum of segments.
        bounds = np.unique(np.r_[0, below, upto, num_neg])
        self._below, self._upto = np.searchsorted(bounds, below), np.searchsorted(bounds, upto)
        segment = np.searchsorted(bounds, np.arange(num_neg), side="right") - 1
        self._segments = scipy.sparse.csr_matrix(  # [K, G]: negatives of slot g in segment k
            (np.ones(num_neg), (segment, g[~y])), shape=(max(len(bounds) - 1, 0), num_groups)
        )
        self._pos_group = g[pos]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        counts_t = np.asarray(counts, np.float64).T  # [G, R]
        neg_cum = np.zeros((self._segments.shape[0] + 1, counts_t.shape[1]))
        np.cumsum(self._segments @ counts_t, axis=0, out=neg_cum[1:])
        w_pos = counts_t[self._pos_group]  # [P, R]
        twice = neg_cum[self._below] + neg_cum[self._upto]  # 2 x credit per unit weight
        numerator = np.einsum("pr,pr->r", w_pos, twice)
        with np.errstate(invalid="ignore", divide="ignore"):
            return numerator / (2.0 * w_pos.sum(axis=0) * neg_cum[-1])


def _summary(stats: np.ndarray, level: float, num_users: int) -> dict:
    """Percentile interval and two-sided p-value of the resampled ``stats`` [R]."""
    defined = stats[np.isfinite(stats)]
    if len(defined) == 0:
        raise ValueError("the metric is undefined in every resample (one class only?)")
    lo, hi = np.quantile(defined, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    p = 2.0 * min(np.mean(defined <= 0.0), np.mean(defined >= 0.0))
    return {
        "lo": float(lo),
        "hi": float(hi),
        "p_value": float(min(1.0, p)),
        "num_users": int(num_users),
        "num_resamples": len(defined),
        "num_undefined": int(len(stats) - len(defined)),
    }


def bootstrap_mean_ci(values_per_user, num_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean of per-user ``values`` [U] (e.g. per-user
    differences of two methods), resampling users with replacement.

    Returns ``mean``, ``lo``, ``hi``, ``p_value`` (two-sided, against a mean of 0),
    ``num_users``, ``num_resamples`` (defined resamples), ``num_undefined`` (always 0 here).
    """
    _check_options(num_resamples, level)
    values = np.asarray(values_per_user, np.float64).reshape(-1)
    if len(values) == 0 or not np.all(np.isfinite(values)):
        raise ValueError("values_per_user must be a non-empty array of finite values")
    rng = np.random.default_rng(seed)
    means = np.concatenate([c @ values / len(values)
                            for c in resample_counts(rng, len(values), num_resamples)])
    return {"mean": float(values.mean()), **_summary(means, level, len(values))}


def paired_bootstrap(users, labels, scores_a, scores_b, metric: str = "auc",
                     num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap interval for ``metric(a) - metric(b)`` on the same rows, resampling users.

    users, labels, scores_a, scores_b: [N]; scores are logits for ``logloss`` (any monotone
    score for the other metrics). ``metric``: ``auc``, ``uauc``, ``logloss``, ``ndcg@K``,
    ``hr@K`` or ``recall@K``. Returns ``diff`` (on the full data), ``lo``, ``hi`` (the
    ``level`` percentile interval), ``p_value``, ``num_users`` (users resampled),
    ``num_resamples`` (resamples where the metric is defined), ``num_undefined`` (the
    others: an AUC resample with one class only), ``metric``. Deterministic given ``seed``.
    """
    _check_options(num_resamples, level)
    users, labels, scores_a = metrics._as_arrays(users, labels, scores_a)
    _, _, scores_b = metrics._as_arrays(users, labels, scores_b)
    rng = np.random.default_rng(seed)
    ids, group = np.unique(users, return_inverse=True)
    group = group.reshape(-1)
    if metric == "auc":
        auc_a, auc_b = WeightedAUC(group, labels, scores_a), WeightedAUC(group, labels, scores_b)
        ones = np.ones((1, len(ids)), np.int64)
        diff = float((auc_a(ones) - auc_b(ones))[0])
        if not np.isfinite(diff):
            raise ValueError("auc is undefined on these rows: labels hold one class only")
        stats = np.concatenate([auc_a(c) - auc_b(c)
                                for c in resample_counts(rng, len(ids), num_resamples)])
        num_users = len(ids)
    elif metric == "logloss":
        loss = lambda x: np.logaddexp(0.0, x) - labels * x
        per_user_loss = np.bincount(group, weights=loss(scores_a) - loss(scores_b),
                                    minlength=len(ids))
        rows = np.bincount(group, minlength=len(ids)).astype(np.float64)
        diff = float(per_user_loss.sum() / rows.sum())
        stats = np.concatenate([(c @ per_user_loss) / (c @ rows)
                                for c in resample_counts(rng, len(ids), num_resamples)])
        num_users = len(ids)
    elif metric == "uauc" or metrics.parse_ranking(metric) is not None:
        _, m_a, keep = metrics.per_user(users, labels, scores_a, metric)
        _, m_b, _ = metrics.per_user(users, labels, scores_b, metric)
        if not keep.any():
            raise ValueError(f"{metric} is undefined on these rows: no user has both labels")
        d = (m_a - m_b)[keep]
        diff = float(d.mean())
        stats = np.concatenate([c @ d / len(d) for c in resample_counts(rng, len(d),
                                                                          num_resamples)])
        num_users = len(d)
    else:
        raise ValueError(f"metric={metric!r} is invalid: expected auc, uauc, logloss, ndcg@K, "
                         "hr@K or recall@K (K a positive integer)")
    return {"diff": diff, **_summary(stats, level, num_users), "metric": metric}
