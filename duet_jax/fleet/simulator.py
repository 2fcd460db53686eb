"""The simulation loop: every policy's rounds of requests, batched generation, delivery and
scoring over a fleet's streams, with one trained DUET (and optionally Base)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from duet_jax import delivery
from duet_jax.cloud import Cloud
from duet_jax.data.batching import batches
from duet_jax.data.samples import SampleSet
from duet_jax.duet import Duet
from duet_jax.fleet.config import FleetConfig
from duet_jax.fleet.policies import embedding_distance, recent_mean_embedding, wants_request
from duet_jax.fleet.records import PolicyRun, round_record
from duet_jax.fleet.streams import Streams
from duet_jax.models import DeviceModel


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
    """Runs policies over a fleet's streams with one trained DUET (and optionally Base).

    Multi-host (``jax.distributed``): every process builds the same streams and runs the
    same simulation; the default cloud's mesh spans every process's accelerators, so each
    round's generation is split over all of them and the heads gathered back onto every
    process (:class:`~duet_jax.cloud.Cloud`). Scoring runs on each process's own
    accelerator, and every process ends with the same records.
    """

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
            duet, duet_params, config.upload, config.min_bucket, config.max_bucket,
            vector_width=config.vector_width)
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
        """Logits ``[len(rows)]`` of samples ``rows``, each with its device's head in
        ``table [U, V]`` (flat heads), in fixed-size jitted batches."""
        return self._score_table(table, self.streams.sample_slot[rows], rows)

    def _score_streamed(self, fmt: str, rows: np.ndarray, trigger: np.ndarray) -> np.ndarray:
        """Logits of samples ``rows``, each scored with the head its device was sent from
        event ``trigger [len(rows)]`` (-1: none yet, a zero head, as the table starts),
        regenerated and delivered again here in chunks of ``max_bucket`` distinct triggers:
        memory stays at one chunk of heads whatever the fleet's size."""
        out = np.zeros(len(rows), np.float32)
        events, inverse = np.unique(trigger, return_inverse=True)
        step = self.config.max_bucket
        for start in range(0, len(events), step):
            chunk = events[start:start + step]
            table = np.zeros((len(chunk), self.spec.num_values), np.float32)
            have = chunk >= 0
            if have.any():
                uploads, _ = self.cloud.device_upload(self.streams.seq[chunk[have]])
                heads, _ = self.cloud.serve(uploads)  # untimed: the device already holds it
                table[have], _ = self._deliver(heads, fmt)
            mine = np.flatnonzero((inverse >= start) & (inverse < start + len(chunk)))
            out[mine] = self._score_table(table, inverse[mine] - start, rows[mine])
        return out

    def _score_table(self, table: np.ndarray, head_row: np.ndarray,
                     rows: np.ndarray) -> np.ndarray:
        """Logits of samples ``rows``, sample ``i`` with the flat head ``table[head_row[i]]``."""
        size = self.config.score_batch_size
        out = []
        for start in range(0, len(rows), size):
            r, h = rows[start : start + size], head_row[start : start + size]
            m = len(r)
            pad = np.r_[np.arange(m), np.zeros(size - m, np.int64)]
            feats = jax.tree.map(lambda f, r=r, pad=pad: f[r[pad]], self.features)
            out.append(np.asarray(self._score(table[h[pad]], feats))[:m])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _deliver(self, heads: Any, fmt: str) -> tuple[np.ndarray, float]:
        """Encode on the cloud (timed), decode on the device -> flat heads ``[n, V]``."""
        start = time.perf_counter()
        jax.block_until_ready(self._encode_payload[fmt](heads))
        seconds = time.perf_counter() - start
        decoded = self._round_trip[fmt](heads)
        return np.asarray(self.spec.flatten(decoded, batch_ndim=1), np.float32), seconds

    def run_policy(self, policy: str) -> PolicyRun:
        """Every round of ``policy``, once per delivery format (the same requests for all)."""
        s, cfg, spec = self.streams, self.config, self.spec
        num_samples = len(s.samples)
        # keep_heads=False: no [devices, values] tables, heads regenerated when scored
        tables = {fmt: np.zeros((s.num_devices, spec.num_values), np.float32)
                  for fmt in cfg.formats} if cfg.keep_heads else None
        last_request = np.full(s.num_devices, -1, np.int64)  # event id of the trigger
        emb_at_request = np.zeros((s.num_devices, self.item_embedding.shape[1]), np.float32)
        logits = {fmt: np.zeros(num_samples, np.float32) for fmt in cfg.formats}
        staleness = np.zeros(num_samples, np.int64)
        trigger_event = np.zeros(num_samples, np.int64)
        requests = np.zeros(s.num_devices, np.int64)
        records = []
        bar = tqdm(range(s.num_rounds), desc=f"fleet {policy}", unit="round",
                   disable=not cfg.progress or jax.process_index() != 0,  # multi-host
                   dynamic_ncols=True)
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
                # keep_heads=False: the round's requests in chunks of max_bucket, so that
                # only one chunk's heads (and their delivered copies) exist at a time
                step = len(req_slots) if cfg.keep_heads else cfg.max_bucket
                for start in range(0, len(req_slots), step):
                    part = slice(start, start + step)
                    uploads, nbytes = self.cloud.device_upload(s.seq[req_events[part]])
                    heads, seconds = self.cloud.serve(uploads)
                    cloud_seconds += seconds
                    up_bytes += int(nbytes.sum())
                    for fmt in cfg.formats:
                        flat, seconds = self._deliver(heads, fmt)
                        encode_seconds[fmt] += seconds
                        if tables is not None:
                            tables[fmt][req_slots[part]] = flat
                    del heads, flat
                last_request[req_slots] = req_events
                requests[req_slots] += 1
                if recent is not None:
                    emb_at_request[req_slots] = recent[want]
            rows = s.round_samples(r)
            slot = s.sample_slot[rows]
            trigger_event[rows] = last_request[slot]
            staleness[rows] = s.index[s.sample_event[rows]] - s.index[last_request[slot]]
            for fmt in cfg.formats:
                logits[fmt][rows] = (self._score_rows(tables[fmt], rows) if tables is not None
                                     else self._score_streamed(fmt, rows, trigger_event[rows]))
                records.append(round_record(
                    policy, fmt, r, s.samples.user[rows], s.samples.label[rows],
                    logits[fmt][rows], online=len(online), requests=len(req_slots),
                    bytes_up=up_bytes,
                    bytes_down=len(req_slots) * delivery.payload_bytes(spec, fmt),
                    cloud_seconds=cloud_seconds, encode_seconds=encode_seconds[fmt],
                    staleness=staleness[rows],
                ))
        bar.close()
        return PolicyRun(policy, records, logits, staleness, trigger_event, requests)

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
            records.append(round_record(
                "base", "static", r, s.samples.user[rows], s.samples.label[rows], logits[rows],
                online=online, requests=0, bytes_up=0, bytes_down=0, cloud_seconds=0.0,
                encode_seconds=0.0, staleness=None,
            ))
        n = len(s.samples)
        return PolicyRun("base", records, {"static": logits}, np.zeros(n, np.int64),
                         np.full(n, -1, np.int64), np.zeros(s.num_devices, np.int64))


def direct_logits(duet: Duet, params: dict, samples: SampleSet, batch_size: int) -> np.ndarray:
    """``Duet.apply`` on ``samples`` as they are (their own ``trigger_seq``): the batched
    evaluation the fleet's ``every_round`` + float32 run must reproduce. -> ``[S]``."""
    fn = jax.jit(duet.apply)
    inputs = {k: getattr(samples, k) for k in ("click_seq", "trigger_seq", "target")}
    return _batched(lambda b: fn(params, b), inputs, batch_size)
