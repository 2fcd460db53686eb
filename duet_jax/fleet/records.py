"""What a fleet run records: one row per (policy, format, round), and a run's totals."""

from __future__ import annotations

import dataclasses

import numpy as np

from duet_jax import metrics
from duet_jax.fleet.streams import Streams


@dataclasses.dataclass
class PolicyRun:
    """One policy under every delivery format: per-round records and per-sample outputs."""

    policy: str
    records: list[dict]  # one per (format, round), see round_record
    logits: dict[str, np.ndarray]  # format -> [S] logits, in Streams.samples order
    staleness: np.ndarray  # [S] interactions between the head's trigger and the sample
    trigger_event: np.ndarray  # [S] event whose start-of-event sequence was the trigger
    requests: np.ndarray  # [U] requests per device


def round_record(
    policy: str,
    fmt: str,
    r: int,
    users: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    *,
    online: int,
    requests: int,
    bytes_up: int,
    bytes_down: int,
    cloud_seconds: float,
    encode_seconds: float,
    staleness: np.ndarray | None,
) -> dict:
    """One round of one (policy, format): traffic, cloud time and the AUCs of the round's
    samples (``users``, ``labels``, ``logits``: ``[n]`` each). ``staleness`` ``[n]``, or
    None where heads do not age (Base)."""
    return {
        "policy": policy,
        "format": fmt,
        "round": r,
        "online_devices": int(online),
        "requests": int(requests),
        "samples": len(labels),
        "bytes_up": int(bytes_up),
        "bytes_down": int(bytes_down),
        "cloud_seconds": cloud_seconds,
        "encode_seconds": encode_seconds,
        "cloud_us_per_request": 1e6 * cloud_seconds / requests if requests else None,
        "mean_staleness": (float(staleness.mean())
                           if staleness is not None and len(staleness) else None),
        **_round_metrics(users, labels, logits),
    }


def _round_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict:
    if len(labels) == 0:
        return {"auc": None, "uauc": None}
    return {"auc": metrics.auc(labels, logits), "uauc": metrics.user_auc(users, labels, logits)}


def totals(run: PolicyRun, streams: Streams, fmt: str) -> dict:
    """One (policy, format)'s whole simulation: traffic, cloud time and all metrics."""
    rec = [r for r in run.records if r["format"] == fmt]
    devices = streams.num_devices
    requests = sum(r["requests"] for r in rec)
    up, down = sum(r["bytes_up"] for r in rec), sum(r["bytes_down"] for r in rec)
    cloud = sum(r["cloud_seconds"] for r in rec)
    s = streams.samples
    result = metrics.evaluate(s.user, s.label, run.logits[fmt])
    return {
        "policy": run.policy,
        "format": fmt,
        "devices": devices,
        "rounds": streams.num_rounds,
        "samples": len(s),
        "requests": requests,
        "requests_per_device": requests / devices,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_up_per_device": up / devices,
        "bytes_down_per_device": down / devices,
        "cloud_seconds": cloud,
        "encode_seconds": sum(r["encode_seconds"] for r in rec),
        "cloud_us_per_request": 1e6 * cloud / requests if requests else None,
        "mean_staleness": float(run.staleness.mean()) if run.policy != "base" else None,
        **result,
    }
