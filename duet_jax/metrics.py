"""Evaluation metrics: AUC, user AUC, logloss, NDCG@K, HR@K and recall@K (host-side numpy,
float64).

Samples are grouped by their ``user`` id (not by consecutive rows). A **list** is one user's
whole set of labelled candidates in the split: all of that user's positives together with all
of their negatives (with the default sampling, each positive brings ``eval_negatives``
sampled negatives, and they all go into the one list). There is one list per user, never one
per positive. The ranking metrics (and UAUC) use the lists with both labels.

For a list with ``P`` positives and ``Q`` negatives, ranked by score (rank 1 = highest), let
``hits@K`` be the number of positives at ranks ``1..K`` and ``d(r) = 1 / log2(r + 1)``:

- ``auc``: ROC AUC over all samples (Mann-Whitney; tied scores count 1/2, as sklearn).
- ``uauc``: unweighted mean of per-list AUC.
- ``logloss``: mean binary cross-entropy of ``sigmoid(logit)``, computed from logits.
- ``ndcg@K``: ``sum_{positive at rank r <= K} d(r)`` divided by
  ``sum_{r=1..min(K, P)} d(r)`` (binary gains; the ideal list has its positives on top).
- ``hr@K``: ``1[hits@K >= 1]``, the standard hit rate: did any positive reach the top K.
- ``recall@K``: ``hits@K / min(K, P)``, so a perfect ranking scores 1 (``= hr@K`` when
  ``P = 1``).

Each ranking metric is the unweighted mean of its per-list value over the lists. Ties in score
are broken pessimistically (a positive ranks below every negative with the same score), so a
constant predictor cannot score well. Note that a list with ``Q < K`` negatives always has
``hr@K = 1``: at most ``Q`` negatives can rank above its first positive.
"""

from __future__ import annotations

import re

import numpy as np

DEFAULT_KS = (5, 10, 20)
RANKING = ("ndcg", "hr", "recall")
METRIC_NAMES = ("auc", "uauc", "logloss", *(f"{m}@{k}" for k in DEFAULT_KS for m in RANKING))
# Bump when a metric's definition changes, so stored results can tell (2: ``hr@K`` became the
# 0/1 hit rate; its former value, hits / min(K, P), is now ``recall@K``).
METRICS_VERSION = 2
_RANKING_NAME = re.compile(r"^(ndcg|hr|recall)@([1-9][0-9]*)$")


def selection_score(metric: str, value: float) -> float:
    """``value`` of ``metric`` as a score where higher is better: logloss is negated, and a
    non-finite value never wins a model selection."""
    if not np.isfinite(value):
        return -np.inf
    return -value if metric == "logloss" else value


def parse_ranking(metric: str) -> tuple[str, int] | None:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; None for a name that is not a ranking metric."""
    match = _RANKING_NAME.match(metric)
    return (match.group(1), int(match.group(2))) if match else None


def _as_arrays(users, labels, scores):
    users = np.asarray(users).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (len(users) == len(labels) == len(scores)):
        raise ValueError(
            f"users, labels, scores differ in length: {len(users)}, {len(labels)}, {len(scores)}"
        )
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score at index {bad} is {scores[bad]}: expected finite values")
    if not np.all((labels == 0) | (labels == 1)):
        bad = int(np.flatnonzero((labels != 0) & (labels != 1))[0])
        raise ValueError(f"label at index {bad} is {labels[bad]}: expected 0 or 1")
    return users, labels.astype(np.float64), scores


def _average_ranks(group: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based ascending rank of each score within its group, ties averaged."""
    order = np.lexsort((scores, group))
    g, s = group[order], scores[order]
    n = len(s)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], n] - 1
    mean_pos = (tie_first[tie_id] + tie_last[tie_id]) / 2.0
    ranks = np.empty(n)
    ranks[order] = mean_pos - group_start + 1.0
    return ranks


def _per_group_auc(group: np.ndarray, labels: np.ndarray, scores: np.ndarray, num_groups: int):
    """-> (auc [G], has_both [G]); auc is NaN where a group lacks a label."""
    ranks = _average_ranks(group, scores)
    n_pos = np.bincount(group, weights=labels, minlength=num_groups)
    n_all = np.bincount(group, minlength=num_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(group, weights=ranks * labels, minlength=num_groups)
    has_both = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where(has_both, auc, np.nan), has_both


def _per_group_ranking(group: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                       num_groups: int, ks) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> ({"ndcg@K", "hr@K", "recall@K": value per list [G]}, has_both [G]); values are NaN
    for a list without both labels."""
    # Sort by user, score descending, and negatives before positives among ties (pessimistic).
    order = np.lexsort((labels, -scores, group))
    g, y = group[order], labels[order]
    n = len(y)
    new_group = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.arange(n) - group_start + 1  # 1-based rank within the list
    n_pos = np.bincount(g, weights=y, minlength=num_groups)
    n_neg = np.bincount(g, minlength=num_groups) - n_pos
    keep = (n_pos > 0) & (n_neg > 0)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            in_top = (rank <= k) & (y > 0)
            dcg = np.bincount(g, weights=in_top / np.log2(rank + 1.0), minlength=num_groups)
            hits = np.bincount(g, weights=in_top.astype(np.float64), minlength=num_groups)
            ideal_n = np.minimum(n_pos, k)
            discounts = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
            idcg = discounts[ideal_n.astype(np.int64)]
            out[f"ndcg@{k}"] = np.where(keep, dcg / idcg, np.nan)
            out[f"hr@{k}"] = np.where(keep, (hits > 0).astype(np.float64), np.nan)
            out[f"recall@{k}"] = np.where(keep, hits / ideal_n, np.nan)
    return out, keep


def per_user(users, labels, scores, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One list metric (``uauc`` or a ranking metric) per user.

    users, labels, scores: [N]. Returns (user ids [G] in ascending order, value [G],
    has_both [G]); the value is NaN where the user's list lacks a label. ``uauc`` gives each
    list's AUC. The mean of ``value[has_both]`` is the metric of :func:`evaluate`.
    """
    users, labels, scores = _as_arrays(users, labels, scores)
    ids, group = np.unique(users, return_inverse=True)
    group = group.reshape(-1)
    if metric == "uauc":
        values, has_both = _per_group_auc(group, labels, scores, len(ids))
        return ids, values, has_both
    parsed = parse_ranking(metric)
    if parsed is None:
        raise ValueError(f"metric {metric!r} has no per-user value: expected uauc, ndcg@K, "
                         "hr@K or recall@K (K a positive integer)")
    values, has_both = _per_group_ranking(group, labels, scores, len(ids), (parsed[1],))
    return ids, values[metric], has_both


def auc(labels, scores) -> float:
    """ROC AUC; NaN if only one class is present."""
    _, labels, scores = _as_arrays(np.zeros(len(np.asarray(labels).reshape(-1))), labels, scores)
    value, _ = _per_group_auc(np.zeros(len(labels), np.int64), labels, scores, 1)
    return float(value[0])


def user_auc(users, labels, scores) -> float:
    """Mean AUC over users with both labels (unweighted); NaN if there are none."""
    _, values, has_both = per_user(users, labels, scores, "uauc")
    return float(values[has_both].mean()) if has_both.any() else float("nan")


def logloss(labels, logits) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)``: ``softplus(x) - y * x``."""
    _, labels, logits = _as_arrays(np.zeros(len(np.asarray(labels).reshape(-1))), labels, logits)
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def ranking_metrics(users, labels, scores, ks=DEFAULT_KS) -> dict[str, float]:
    """``ndcg@K``, ``hr@K`` and ``recall@K`` for each K in ``ks``: means over the lists (users)
    with both labels, NaN if there are none (formulas in the module doc)."""
    users, labels, scores = _as_arrays(users, labels, scores)
    ids, group = np.unique(users, return_inverse=True)
    values, keep = _per_group_ranking(group.reshape(-1), labels, scores, len(ids), ks)
    out = {}
    for k in ks:
        for m in RANKING:
            name = f"{m}@{k}"
            out[name] = float(values[name][keep].mean()) if keep.any() else float("nan")
    return out


def evaluate(users, labels, logits, ks=DEFAULT_KS) -> dict[str, float]:
    """All metrics for one split: ``auc``, ``uauc``, ``logloss``, then ``ndcg@K``, ``hr@K``,
    ``recall@K`` for each K (the order of :data:`METRIC_NAMES` for the default ``ks``)."""
    users, labels, logits = _as_arrays(users, labels, logits)
    result = {
        "auc": auc(labels, logits),
        "uauc": user_auc(users, labels, logits),
        "logloss": logloss(labels, logits),
    }
    result.update(ranking_metrics(users, labels, logits, ks))
    return result
