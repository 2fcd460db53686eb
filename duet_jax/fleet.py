"""Device-cloud fleet simulation: rounds, request policies, uploads, generation, delivery.

**Streams.** Each device's device-test period is a chronological stream of *events*; an
event is one interaction (a position of :func:`~duet_jax.data.samples.build_samples`) with
its labelled samples (the positive and its sampled negatives), which all share the
sequence before the event (``click_seq``). Events come from a :class:`SampleSet` in storage
order: rows of one device contiguous, consecutive rows with the same ``click_seq`` one
event (a second positive among them starts another), as ``build_samples`` writes them.

**Rounds.** Each device's stream is cut into ``T`` chunks of nearly equal length: event
``k`` of a device with ``n`` events falls in round ``k * T // n`` (a device with fewer than
``T`` events skips some rounds). A device is *online* in a round when it has events in it.

**One round** ``r``, for every online device:
1. It has received the interactions of its earlier rounds: its sequence is the sequence at
   the start of the round, ``click_seq`` of its first event in ``r``. Nothing of round
   ``r`` itself is in it, so the items about to be scored never leak into a trigger.
2. Its policy decides whether to request new parameters (below). A device without a head
   (its first online round, the start of its device period) always requests.
3. Requests go up (raw ids or z, see :mod:`duet_jax.cloud`); the cloud answers all of the
   round's requests in batched jitted generation, and sends each head down in the delivery
   format (:mod:`duet_jax.delivery`). The device decodes it and swaps it in.
4. The device scores every sample of its round-``r`` events with the head it holds, fresh
   or stale. Then those interactions join its sequence.

**Policies**: ``every_round`` (request whenever there are new items since the last
request, so each round is scored with a head from the sequence at its start),
``every_k_items`` (at least ``every_k`` new items), ``drift_threshold`` (the mean item
embedding of the ``drift_window`` most recent items moved more than ``threshold`` from its
value at the last request: cosine distance or L2), ``never`` (the head of the first sync is
kept). Base, the static cloud head, is scored alongside as the no-adaptation reference.

*Staleness* of a scored sample is the number of its device's interactions between the
trigger of the head it is scored with and the sample's own event (0 = fresh).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from duet_jax import delivery, metrics
from duet_jax.cloud import UPLOADS, Cloud
from duet_jax.data.batching import batches
from duet_jax.data.samples import SampleSet
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError, DataError
from duet_jax.models import DeviceModel

POLICIES = ("every_round", "every_k_items", "drift_threshold", "never")
DISTANCES = ("cosine", "l2")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """``config.fleet``: who takes part, how rounds and requests work, what is sent."""

    num_devices: int = 0  # N: 0 = every device with a device-test period
    num_rounds: int = 10  # T
    policies: tuple[str, ...] = POLICIES
    every_k: int = 3  # every_k_items: new items since the last request
    threshold: float = 0.1  # drift_threshold: distance that triggers a request
    drift_window: int = 5  # drift_threshold: recent items whose mean embedding is compared
    distance: str = "cosine"  # drift_threshold: cosine (1 - cos) or l2
    formats: tuple[str, ...] = delivery.FORMATS
    upload: str = "ids"  # ids | z (the embedding-only, privacy-preserving variant)
    base: bool = True  # also score Base, the static cloud head
    min_bucket: int = 64  # cloud batches: powers of two in [min_bucket, max_bucket]
    max_bucket: int = 4096
    score_batch_size: int = 2048  # device-side scoring, rows per jitted call
    seed: int = 0  # which devices take part when num_devices < all
    progress: bool = True

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.fleet.{name}", getattr(self, name), expected)

        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        for name, low in [("num_devices", 0), ("num_rounds", 1), ("every_k", 1),
                          ("drift_window", 1), ("min_bucket", 1), ("max_bucket", 1),
                          ("score_batch_size", 1), ("seed", 0)]:
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, f"an integer >= {low}")
        if self.max_bucket < self.min_bucket:
            fail("max_bucket", f"an integer >= min_bucket ({self.min_bucket})")
        for name, known in [("policies", POLICIES), ("formats", delivery.FORMATS)]:
            value = getattr(self, name)
            if not value or any(v not in known for v in value) or len(set(value)) != len(value):
                fail(name, f"a comma-separated list of distinct names from {list(known)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not np.isfinite(t) or t < 0:
            fail("threshold", "a finite number >= 0")
        if self.distance not in DISTANCES:
            fail("distance", f"one of {list(DISTANCES)}")
        if self.upload not in UPLOADS:
            fail("upload", f"one of {list(UPLOADS)}")
        for name in ("base", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")

    @classmethod
    def from_config(cls, fleet: ml_collections.ConfigDict) -> FleetConfig:
        """From ``config.fleet``; comma-separated strings become tuples. Unknown fields raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in fleet.items():
            if name not in fields:
                raise ConfigError(f"config.fleet.{name}", value, f"a known field: {sorted(fields)}")
            if name in ("policies", "formats") and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif name in ("policies", "formats") and isinstance(value, list | tuple):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:  # report the value as the user wrote it, not the tuple
            name = err.field.rsplit(".", 1)[-1]
            raise ConfigError(err.field, fleet.get(name, err.value), err.expected) from None


@dataclasses.dataclass
class Streams:
    """The fleet's events, sorted by (device, time); ``E`` events, ``S`` samples, ``U`` devices."""

    samples: SampleSet  # the scored samples, grouped by event in event order
    devices: np.ndarray  # [U] user id of each device slot
    slot: np.ndarray  # [E] device slot of each event
    index: np.ndarray  # [E] position of the event in its device's stream (0-based)
    round: np.ndarray  # [E] round of the event
    seq: np.ndarray  # [E, L] the device's sequence before the event (its click_seq)
    sample_event: np.ndarray  # [S] event of each sample
    num_rounds: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def sample_slot(self) -> np.ndarray:
        return self.slot[self.sample_event]

    def first_event(self, r: int) -> np.ndarray:
        """``[U]`` each device's first event in round ``r``; -1 where it is offline."""
        out = np.full(self.num_devices, -1, np.int64)
        events = np.flatnonzero(self.round == r)
        slots, first = np.unique(self.slot[events], return_index=True)  # events are in time order
        out[slots] = events[first]
        return out

    def round_samples(self, r: int) -> np.ndarray:
        """Indices of the samples scored in round ``r``."""
        return np.flatnonzero(self.round[self.sample_event] == r)


def build_streams(
    samples: SampleSet, num_rounds: int, num_devices: int = 0, seed: int = 0
) -> Streams:
    """Events and rounds from device-test samples (module docstring); ``num_devices > 0``
    takes that many devices, drawn without replacement with ``seed``."""
    users = samples.user
    n = len(users)
    if n == 0:
        raise DataError("no device-test samples to simulate a fleet on")
    new_block = np.r_[True, users[1:] != users[:-1]]
    block_users = users[new_block]
    if len(np.unique(block_users)) != len(block_users):
        raise DataError(
            "device-test samples are not grouped by device: one user's rows appear in several "
            "blocks; the fleet needs each device's samples contiguous and in time order"
        )
    chosen = np.unique(block_users)
    if num_devices:
        if num_devices > len(chosen):
            raise ConfigError(
                "config.fleet.num_devices", num_devices,
                f"at most the {len(chosen)} devices with a device-test period (or 0 = all)",
            )
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(chosen, size=num_devices, replace=False))
    keep = np.flatnonzero(np.isin(users, chosen))
    samples = SampleSet(**samples.take(keep))
    users, seqs = samples.user, samples.click_seq
    group = np.r_[True, (users[1:] != users[:-1]) | np.any(seqs[1:] != seqs[:-1], axis=1)]
    # Repeated items can make two consecutive positions share a full window: a second
    # positive within one (user, click_seq) group starts a new event (positives lead their
    # negatives, as build_samples writes them).
    positives = np.cumsum(samples.label > 0)
    before = positives - (samples.label > 0)  # positives strictly before each row
    group_start = np.maximum.accumulate(np.where(group, np.arange(len(users)), 0))
    new_event = group | ((samples.label > 0) & (before > before[group_start]))
    sample_event = np.cumsum(new_event) - 1
    starts = np.flatnonzero(new_event)
    event_user = users[starts]
    slot = np.searchsorted(chosen, event_user)
    first_of_device = np.r_[True, event_user[1:] != event_user[:-1]]
    device_start = np.maximum.accumulate(np.where(first_of_device, np.arange(len(starts)), 0))
    index = np.arange(len(starts)) - device_start
    length = np.bincount(slot, minlength=len(chosen))[slot]
    return Streams(
        samples=samples,
        devices=chosen.astype(np.int64),
        slot=slot.astype(np.int64),
        index=index.astype(np.int64),
        round=(index * num_rounds // length).astype(np.int64),
        seq=seqs[starts],
        sample_event=sample_event.astype(np.int64),
        num_rounds=num_rounds,
    )


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
    since the last request; ``moved``: the drift distance (drift_threshold only)."""
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


@dataclasses.dataclass
class PolicyRun:
    """One policy under every delivery format: per-round records and per-sample outputs."""

    policy: str
    records: list[dict]  # one per (format, round)
    logits: dict[str, np.ndarray]  # format -> [S] logits, in Streams.samples order
    staleness: np.ndarray  # [S] interactions between the head's trigger and the sample
    trigger_event: np.ndarray  # [S] event whose start-of-event sequence was the trigger
    requests: np.ndarray  # [U] requests per device


def _batched(fn: Callable, arrays: dict[str, np.ndarray], size: int) -> np.ndarray:
    """``fn`` over row batches of ``arrays`` (padded to ``size`` rows, so jit compiles once)."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, size):
        chunk = {k: v[start : start + size] for k, v in arrays.items()}
        m = len(next(iter(chunk.values())))
        padded = {k: np.concatenate([v, np.repeat(v[:1], size - m, axis=0)]) if m < size else v
                  for k, v in chunk.items()}
        out.append(np.asarray(fn(padded))[:m])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class Simulator:
    """Runs policies over a fleet's streams with one trained DUET (and optionally Base)."""

    def __init__(
        self,
        streams: Streams,
        duet: Duet,
        duet_params: dict,
        config: FleetConfig,
        cloud: Cloud | None = None,
    ):
        self.streams, self.duet, self.params, self.config = streams, duet, duet_params, config
        self.spec = duet.spec
        self.cloud = cloud or Cloud(
            duet, duet_params, config.upload, config.min_bucket, config.max_bucket
        )
        model = duet.model
        size = config.score_batch_size
        # The device runs its backbone on each sample once; only the head changes with the
        # policy and format, so the backbone features are computed once and reused.
        encode = jax.jit(model.encode)
        parts = [
            jax.device_get(encode(duet_params["backbone"], {k: batch[k] for k in
                                                            ("click_seq", "target")}))
            for batch in batches(streams.samples, size)
        ]
        self.features = jax.tree.map(lambda *xs: np.concatenate(xs)[: len(streams.samples)],
                                     *parts)
        spec = self.spec
        self._score = jax.jit(lambda flat, feats: model.head_logits(spec.unflatten(flat), feats))
        self._round_trip = {
            fmt: jax.jit(functools.partial(delivery.round_trip, spec, fmt=fmt))
            for fmt in config.formats
        }
        self._encode_payload = {
            fmt: jax.jit(functools.partial(delivery.encode, spec, fmt=fmt))
            for fmt in config.formats
        }
        self.item_embedding = np.asarray(duet_params["backbone"]["item_embedding"])

    def _score_rows(self, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        slot = self.streams.sample_slot[rows]
        size = self.config.score_batch_size
        out = []
        for start in range(0, len(rows), size):
            r, s = rows[start : start + size], slot[start : start + size]
            m = len(r)
            pad = np.r_[np.arange(m), np.zeros(size - m, np.int64)]
            feats = jax.tree.map(lambda f, r=r, pad=pad: f[r[pad]], self.features)
            out.append(np.asarray(self._score(table[s[pad]], feats))[:m])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _deliver(self, heads: Any, fmt: str) -> tuple[np.ndarray, float]:
        """Encode on the cloud (timed), decode on the device -> flat heads ``[n, V]``."""
        start = time.perf_counter()
        jax.block_until_ready(self._encode_payload[fmt](heads))
        seconds = time.perf_counter() - start
        decoded = self._round_trip[fmt](heads)
        return np.asarray(self.spec.flatten(decoded, batch_ndim=1), np.float32), seconds

    def run_policy(self, policy: str) -> PolicyRun:
        s, cfg, spec = self.streams, self.config, self.spec
        num_samples = len(s.samples)
        tables = {fmt: np.zeros((s.num_devices, spec.num_values), np.float32)
                  for fmt in cfg.formats}
        last_request = np.full(s.num_devices, -1, np.int64)  # event id of the trigger
        emb_at_request = np.zeros((s.num_devices, self.item_embedding.shape[1]), np.float32)
        logits = {fmt: np.zeros(num_samples, np.float32) for fmt in cfg.formats}
        staleness = np.zeros(num_samples, np.int64)
        trigger_event = np.zeros(num_samples, np.int64)
        requests = np.zeros(s.num_devices, np.int64)
        records = []
        bar = tqdm(range(s.num_rounds), desc=f"fleet {policy}", unit="round",
                   disable=not cfg.progress, dynamic_ncols=True)
        for r in bar:
            first = s.first_event(r)
            online = np.flatnonzero(first >= 0)
            events = first[online]
            has_head = last_request[online] >= 0
            new_items = np.where(
                has_head, s.index[events] - s.index[np.maximum(last_request[online], 0)], 0
            )
            moved = None
            recent = None
            if policy == "drift_threshold":
                recent = recent_mean_embedding(self.item_embedding, s.seq[events],
                                               cfg.drift_window)
                moved = embedding_distance(recent, emb_at_request[online], cfg.distance)
            want = wants_request(policy, cfg, has_head, new_items, moved)
            req_slots, req_events = online[want], events[want]
            up_bytes, cloud_seconds, encode_seconds = 0, 0.0, dict.fromkeys(cfg.formats, 0.0)
            if len(req_slots):
                uploads, nbytes = self.cloud.device_upload(s.seq[req_events])
                heads, cloud_seconds = self.cloud.serve(uploads)
                up_bytes = int(nbytes.sum())
                for fmt in cfg.formats:
                    tables[fmt][req_slots], encode_seconds[fmt] = self._deliver(heads, fmt)
                last_request[req_slots] = req_events
                requests[req_slots] += 1
                if recent is not None:
                    emb_at_request[req_slots] = recent[want]
            rows = s.round_samples(r)
            slot = s.sample_slot[rows]
            trigger_event[rows] = last_request[slot]
            staleness[rows] = s.index[s.sample_event[rows]] - s.index[last_request[slot]]
            for fmt in cfg.formats:
                logits[fmt][rows] = self._score_rows(tables[fmt], rows)
                records.append(self._record(
                    policy, fmt, r, rows, logits[fmt][rows], len(online), len(req_slots),
                    up_bytes, cloud_seconds, encode_seconds[fmt], staleness[rows],
                ))
        bar.close()
        return PolicyRun(policy, records, logits, staleness, trigger_event, requests)

    def _record(self, policy, fmt, r, rows, logits, online, n_req, up_bytes, cloud_seconds,
                encode_seconds, staleness) -> dict:
        labels, users = self.streams.samples.label[rows], self.streams.samples.user[rows]
        down = n_req * delivery.payload_bytes(self.spec, fmt)
        return {
            "policy": policy,
            "format": fmt,
            "round": r,
            "online_devices": int(online),
            "requests": int(n_req),
            "samples": len(rows),
            "bytes_up": int(up_bytes),
            "bytes_down": int(down),
            "cloud_seconds": cloud_seconds,
            "encode_seconds": encode_seconds,
            "cloud_us_per_request": 1e6 * cloud_seconds / n_req if n_req else None,
            "mean_staleness": float(staleness.mean()) if len(rows) else None,
            **_round_metrics(users, labels, logits),
        }

    def base_run(self, model: DeviceModel, base_params: dict) -> PolicyRun:
        """Base: the static cloud head on every device; nothing is requested or sent."""
        s = self.streams
        logits_fn = jax.jit(lambda p, b: model.apply(p["backbone"], p["head"], b))
        inputs = {k: getattr(s.samples, k) for k in ("click_seq", "target")}
        logits = _batched(lambda b: logits_fn(base_params, b), inputs,
                          self.config.score_batch_size)
        records = []
        for r in range(s.num_rounds):
            rows = s.round_samples(r)
            online = int((s.first_event(r) >= 0).sum())
            records.append({
                "policy": "base", "format": "static", "round": r, "online_devices": online,
                "requests": 0, "samples": len(rows), "bytes_up": 0, "bytes_down": 0,
                "cloud_seconds": 0.0, "encode_seconds": 0.0, "cloud_us_per_request": None,
                "mean_staleness": None,
                **_round_metrics(s.samples.user[rows], s.samples.label[rows], logits[rows]),
            })
        n = len(s.samples)
        return PolicyRun("base", records, {"static": logits}, np.zeros(n, np.int64),
                         np.full(n, -1, np.int64), np.zeros(s.num_devices, np.int64))


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


def direct_logits(duet: Duet, params: dict, samples: SampleSet, batch_size: int) -> np.ndarray:
    """``Duet.apply`` on ``samples`` as they are (their own ``trigger_seq``): the batched
    evaluation the fleet's ``every_round`` + float32 run must reproduce."""
    fn = jax.jit(duet.apply)
    inputs = {k: getattr(samples, k) for k in ("click_seq", "trigger_seq", "target")}
    return _batched(lambda b: fn(params, b), inputs, batch_size)


def start_of_round_samples(streams: Streams) -> SampleSet:
    """The streams' samples with ``trigger_seq`` = the device's sequence at the start of the
    sample's round (what ``every_round`` requests with)."""
    first_in_round = np.full((streams.num_devices, streams.num_rounds), -1, np.int64)
    for r in range(streams.num_rounds):
        first_in_round[:, r] = streams.first_event(r)
    event = streams.sample_event
    trigger = first_in_round[streams.slot[event], streams.round[event]]
    arrays = streams.samples.arrays()
    arrays["trigger_seq"] = streams.seq[trigger]
    return SampleSet(**arrays)

