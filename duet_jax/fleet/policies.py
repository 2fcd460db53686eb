"""When a device requests a new head: the request policies and the drift distance.

``every_round`` requests whenever there are new items since the last request, so each round
is scored with a head from the sequence at its start; ``every_k_items`` waits for at least
``every_k`` new items; ``drift_threshold`` requests when the mean item embedding of the
``drift_window`` most recent items moved more than ``threshold`` from its value at the last
request (cosine distance or L2); ``never`` keeps the head of the first sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config.py imports the names below to validate against them
    from duet_jax.fleet.config import FleetConfig

POLICIES = ("every_round", "every_k_items", "drift_threshold", "never")
DISTANCES = ("cosine", "l2")


def recent_mean_embedding(item_embedding: np.ndarray, seqs: np.ndarray, window: int) -> np.ndarray:
    """Mean embedding of the last ``window`` items of right-padded ``seqs [n, L]`` -> ``[n, D]``
    (zeros for an empty sequence). Runs on the device, with its backbone's item table."""
    lengths = (seqs > 0).sum(axis=1)
    j = np.arange(seqs.shape[1])[None, :]
    recent = (j < lengths[:, None]) & (j >= lengths[:, None] - window)
    emb = item_embedding[seqs] * recent[..., None]
    return emb.sum(axis=1) / np.maximum(recent.sum(axis=1), 1)[:, None]


def embedding_distance(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    """Row-wise ``1 - cos(a, b)`` or ``||a - b||``; ``[n, D]`` x2 -> ``[n]``."""
    if distance == "l2":
        return np.linalg.norm(a - b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, 1.0 - cos, 0.0)


def wants_request(
    policy: str,
    config: FleetConfig,
    has_head: np.ndarray,
    new_items: np.ndarray,
    moved: np.ndarray | None,
) -> np.ndarray:
    """Which online devices request this round (``[n]`` bool). ``new_items``: interactions
    since the last request; ``moved``: the drift distance (drift_threshold only). A device
    without a head always requests."""
    if policy == "every_round":
        want = new_items > 0
    elif policy == "every_k_items":
        want = new_items >= config.every_k
    elif policy == "drift_threshold":
        want = (new_items > 0) & (moved > config.threshold)
    elif policy == "never":
        want = np.zeros(len(has_head), bool)
    else:
        raise ValueError(f"unknown policy {policy!r}: expected one of {POLICIES}")
    return want | ~has_head
