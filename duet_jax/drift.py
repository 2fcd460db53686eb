"""How far each device drifted: the distance between what it clicked in the cloud period
and what it clicks in its device period, measured in a trained model's item space.

If DUET adapts heads to drifting devices, its gain over Base should grow with this score;
if the gain is flat across drift quartiles, it is more likely extra capacity.

The score of device ``u`` is the cosine distance between the mean embedding of its
positive targets in ``cloud`` (cloud-train) rows and in ``device`` (device-test) rows:
``1 - cos(mean_t∈cloud e_t, mean_t∈device e_t)``, with ``e`` the model's own embedding of a
single item (:meth:`DeviceModel.embed_sequence` of a sequence holding only that item, so
any registered model works). Devices without positives in either period get NaN.

>>> import numpy as np
>>> emb = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # item 0 is padding
>>> drift_scores(emb, np.array([0, 0, 1]), np.array([1, 1, 2]), np.array([0, 1]),
...              np.array([1, 1]), num_users=2).round(6).tolist()
[0.0, 1.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.data.samples import SampleSet
from duet_jax.models import DeviceModel


def item_embeddings(model: DeviceModel, backbone, num_items: int,
                    batch_size: int = 4096) -> np.ndarray:
    """``[num_items + 1, F]``: the model's embedding of each item id as the first position
    of an otherwise padded sequence (row 0, padding, included); models that need the full
    ``seq_len`` (SASRec's positions) get it. Batched so memory stays bounded."""
    embed = jax.jit(lambda b, s: model.embed_sequence(b, s)[0][:, 0])
    ids = np.arange(num_items + 1, dtype=np.int32)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        padded = np.zeros((batch_size, model.config.seq_len), np.int32)  # one static shape
        padded[: len(chunk), 0] = chunk
        out.append(np.asarray(embed(backbone, jnp.asarray(padded)))[: len(chunk)])
    return np.concatenate(out).astype(np.float64)


def drift_scores(embeddings: np.ndarray, cloud_users: np.ndarray, cloud_items: np.ndarray,
                 device_users: np.ndarray, device_items: np.ndarray,
                 num_users: int) -> np.ndarray:
    """``[num_users]`` cosine distances between each user's mean cloud-period and mean
    device-period item embedding (NaN where a period has no items)."""

    def centroids(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sums = np.zeros((num_users, embeddings.shape[1]))
        np.add.at(sums, users, embeddings[items])
        counts = np.bincount(users, minlength=num_users)
        return sums / np.maximum(counts, 1)[:, None], counts

    a, na = centroids(np.asarray(cloud_users), np.asarray(cloud_items))
    b, nb = centroids(np.asarray(device_users), np.asarray(device_items))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.einsum("ud,ud->u", a, b) / np.where(norms > 0, norms, 1.0)
    return np.where((na > 0) & (nb > 0) & (norms > 0), 1.0 - cos, np.nan)


def device_drift(model: DeviceModel, backbone, cloud: SampleSet, device: SampleSet,
                 num_users: int, num_items: int) -> np.ndarray:
    """:func:`drift_scores` of every user from the positives of ``cloud`` (cloud-train) and
    ``device`` (device-test) samples, in ``model``'s item space."""
    emb = item_embeddings(model, backbone, num_items)
    pc, pd = cloud.label > 0, device.label > 0
    return drift_scores(emb, cloud.user[pc], cloud.target[pc], device.user[pd],
                        device.target[pd], num_users)


def quartile_gains(drift: np.ndarray, per_user_a: np.ndarray,
                   per_user_b: np.ndarray) -> list[dict]:
    """Mean per-user gain ``a - b`` (e.g. DUET's minus Base's per-user AUC) in each drift
    quartile, over users with a finite drift score and finite values of both."""
    ok = np.isfinite(drift) & np.isfinite(per_user_a) & np.isfinite(per_user_b)
    if not ok.any():
        return []
    d, gain = drift[ok], (per_user_a - per_user_b)[ok]
    edges = np.quantile(d, [0.0, 0.25, 0.5, 0.75, 1.0])
    which = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, 3)
    out = []
    for q in range(4):
        sel = which == q
        n = int(sel.sum())
        out.append({
            "quartile": q + 1,
            "drift_lo": float(edges[q]),
            "drift_hi": float(edges[q + 1]),
            "users": n,
            "gain_mean": float(gain[sel].mean()) if n else float("nan"),
            "gain_sem": float(gain[sel].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        })
    return out
