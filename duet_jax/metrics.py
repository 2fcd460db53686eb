"""Evaluation metrics: AUC, user AUC, logloss, NDCG@K and HR@K (host-side numpy, float64).

Samples are grouped by their ``user`` id (not by consecutive rows), and every per-user
metric ranks a user's own labelled candidates (positives and negatives of the split).

- ``auc``: ROC AUC over all samples (Mann-Whitney; tied scores count 1/2, as sklearn).
- ``uauc``: unweighted mean of per-user AUC over users with both labels.
- ``logloss``: mean binary cross-entropy of ``sigmoid(logit)``, computed from logits.
- ``ndcg@K``: DCG@K / IDCG@K with binary gains, ``DCG = sum 1/log2(rank + 1)`` over
  positives ranked in the top K, ``IDCG`` the same for a perfect ranking
  (``min(K, n_pos)`` positives on top).
- ``hr@K``: positives in the top K divided by ``min(K, n_pos)``, so 1.0 is a perfect ranking.
- Ranking users are those with both labels (as for UAUC); ties in score are broken
  pessimistically (a positive ranks below a negative with the same score), so a constant
  predictor cannot score well.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 20)
METRIC_NAMES = ("auc", "uauc", "logloss", *(f"{m}@{k}" for k in DEFAULT_KS for m in ("ndcg", "hr")))


def selection_score(metric: str, value: float) -> float:
    """``value`` of ``metric`` as a score where higher is better: logloss is negated, and a
    non-finite value never wins a model selection."""
    if not np.isfinite(value):
        return -np.inf
    return -value if metric == "logloss" else value


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


def auc(labels, scores) -> float:
    """ROC AUC; NaN if only one class is present."""
    _, labels, scores = _as_arrays(np.zeros(len(np.asarray(labels).reshape(-1))), labels, scores)
    value, _ = _per_group_auc(np.zeros(len(labels), np.int64), labels, scores, 1)
    return float(value[0])


def user_auc(users, labels, scores) -> float:
    """Mean AUC over users with both labels (unweighted); NaN if there are none."""
    users, labels, scores = _as_arrays(users, labels, scores)
    _, group = np.unique(users, return_inverse=True)
    values, has_both = _per_group_auc(group, labels, scores, group.max(initial=-1) + 1)
    return float(values[has_both].mean()) if has_both.any() else float("nan")


def logloss(labels, logits) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)``: ``softplus(x) - y * x``."""
    _, labels, logits = _as_arrays(np.zeros(len(np.asarray(labels).reshape(-1))), labels, logits)
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def ranking_metrics(users, labels, scores, ks=DEFAULT_KS) -> dict[str, float]:
    """``ndcg@K`` and ``hr@K`` averaged over users with both labels (see module doc)."""
    users, labels, scores = _as_arrays(users, labels, scores)
    _, group = np.unique(users, return_inverse=True)
    num_groups = group.max(initial=-1) + 1
    # Sort by user, score descending, and negatives before positives among ties (pessimistic).
    order = np.lexsort((labels, -scores, group))
    g, y = group[order], labels[order]
    n = len(y)
    new_group = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.arange(n) - group_start + 1  # 1-based rank within the user
    n_pos = np.bincount(g, weights=y, minlength=num_groups)
    n_neg = np.bincount(g, minlength=num_groups) - n_pos
    keep = (n_pos > 0) & (n_neg > 0)
    out = {}
    for k in ks:
        in_top = (rank <= k) & (y > 0)
        dcg = np.bincount(g, weights=in_top / np.log2(rank + 1.0), minlength=num_groups)
        hits = np.bincount(g, weights=in_top.astype(np.float64), minlength=num_groups)
        ideal_n = np.minimum(n_pos, k)
        discounts = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
        idcg = discounts[ideal_n.astype(np.int64)]
        if keep.any():
            out[f"ndcg@{k}"] = float(np.mean(dcg[keep] / idcg[keep]))
            out[f"hr@{k}"] = float(np.mean(hits[keep] / ideal_n[keep]))
        else:
            out[f"ndcg@{k}"] = out[f"hr@{k}"] = float("nan")
    return out


def evaluate(users, labels, logits, ks=DEFAULT_KS) -> dict[str, float]:
    """All metrics for one split: ``auc``, ``uauc``, ``logloss``, ``ndcg@K``, ``hr@K``."""
    users, labels, logits = _as_arrays(users, labels, logits)
    result = {
        "auc": auc(labels, logits),
        "uauc": user_auc(users, labels, logits),
        "logloss": logloss(labels, logits),
    }
    result.update(ranking_metrics(users, labels, logits, ks))
    return result
