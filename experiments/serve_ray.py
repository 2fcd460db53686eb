"""The generation server on Ray Serve: replicas across a Ray cluster, Ray's dynamic batching.

    python -m experiments.serve_ray --checkpoint=runs/synthetic/duet --replicas=2 --port=8000

Starts a local Ray instance (or joins ``--address``), deploys ``--replicas`` copies of the
generator and serves the same ``POST /v1/generate`` bodies as ``experiments.serve``
(:mod:`duet_jax.serving.codec`) until Ctrl-C. Batching is Ray Serve's ``@serve.batch``
(``--max_batch``, ``--max_wait_ms``); each replica compiles its buckets at start-up.
Needs the ``ray`` extra (``ray[serve]``). The plain server (``experiments.serve``) stays the
default: no Ray needed.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Sequence

import numpy as np
from absl import flags

from duet_jax import delivery
from duet_jax.cloud import UPLOADS
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A DUET run directory.")
_ADDRESS = flags.DEFINE_string("address", None, "Ray cluster to join (default: start one).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "HTTP proxy interface.")
_PORT = flags.DEFINE_integer("port", 8000, "HTTP proxy port.")
_REPLICAS = flags.DEFINE_integer("replicas", 1, "Generator replicas.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "@serve.batch max_batch_size.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 2.0, "@serve.batch batch_wait_timeout_s.")
_CPUS = flags.DEFINE_float("cpus_per_replica", 1.0, "Ray CPUs each replica reserves.")
_PIN = flags.DEFINE_bool(
    "pin_cores", False, "Pin each replica to its own ceil(cpus_per_replica) cores of its node "
    "(by the replica's local rank), so that each XLA thread pool sizes itself to them. For a "
    "node that runs this deployment alone.")


def replica_cores(local_rank: int, cpus_per_replica: float,
                  available: Sequence[int]) -> list[int] | None:
    """The cores the replica of ``local_rank`` on its node pins to: the ``local_rank``-th
    block of ``ceil(cpus_per_replica)`` of ``available`` (sorted), or ``None`` when the
    node's cores run out before that block."""
    if local_rank < 0:
        raise ValueError(f"local_rank {local_rank}: expected >= 0")
    per = max(1, math.ceil(cpus_per_replica))
    cores = sorted(available)[local_rank * per:(local_rank + 1) * per]
    return cores if len(cores) == per else None


def pin_process(cores: Sequence[int]) -> None:
    """Every thread of this process (threads started later inherit it) onto ``cores``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def _pin_this_replica(cpus_per_replica: float) -> None:
    """Pins this replica (before its first JAX call, so XLA's CPU thread pool is sized by
    the pinned cores), or leaves it unpinned with a warning when it cannot."""
    from ray import serve

    rank = getattr(serve.get_replica_context(), "rank", None)
    local_rank = getattr(rank, "local_rank", None)
    if local_rank is None or not hasattr(os, "sched_setaffinity"):
        logging.warning("pin_cores: this Ray or platform gives no replica rank or affinity; "
                        "the replica is not pinned")
        return
    available = sorted(os.sched_getaffinity(0))
    cores = replica_cores(local_rank, cpus_per_replica, available)
    if cores is None:
        logging.warning("pin_cores: replica %d finds no block of %s CPUs of its own among the "
                        "node's %d cores; it is not pinned", local_rank, cpus_per_replica,
                        len(available))
        return
    pin_process(cores)


class Generator:
    """One replica: an :class:`duet_jax.serving.engine.Engine` behind ``@serve.batch``.

    Each call of :meth:`generate` is one request (one or more rows); Ray hands a list of
    concurrent requests to :meth:`_batch`, which runs them as one call per (kind, format),
    in chunks of at most ``max_batch`` rows.
    """

    def __init__(self, checkpoint: str, max_batch: int = 64, max_wait_ms: float = 2.0,
                 uploads: tuple[str, ...] = UPLOADS,
                 formats: tuple[str, ...] = delivery.FORMATS, warm_up: bool = True,
                 pin_cores: bool = False, cpus_per_replica: float = 1.0):
        from ray import serve

        from duet_jax.serving import codec
        from duet_jax.serving.engine import Engine, load_run

        if pin_cores:
            _pin_this_replica(cpus_per_replica)
        self.engine = Engine(load_run(checkpoint), max_batch=max_batch, uploads=uploads,
                             formats=formats)
        if warm_up:
            self.engine.warm_up()
        self.limits = codec.Limits(self.engine.seq_len, self.engine.num_items,
                                   self.engine.z_dim, max_batch, uploads=uploads,
                                   formats=formats)
        self.meta = {"version": self.engine.version, "layout": self.engine.layout.to_json()}
        # @serve.batch is applied per instance so its sizes can come from the arguments
        # sizes counted in rows, not requests (a request may carry several)
        self._batched = serve.batch(max_batch_size=max_batch,
                                    batch_wait_timeout_s=max_wait_ms / 1e3,
                                    batch_size_fn=_rows)(self._batch)

    def affinity(self) -> list[int]:
        """The cores this replica's process may run on (what ``pin_cores`` set)."""
        return sorted(os.sched_getaffinity(0))

    async def _batch(self, items: list[tuple[str, str, np.ndarray]]) -> list:
        from duet_jax.serving.batcher import leaf_rows

        out: list = [None] * len(items)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (kind, fmt, _) in enumerate(items):
            groups.setdefault((kind, fmt), []).append(i)
        for (kind, fmt), idx in groups.items():
            x = np.concatenate([items[i][2] for i in idx])
            parts, timings = [], []
            for start in range(0, len(x), self.engine.max_batch):
                chunk = x[start:start + self.engine.max_batch]
                leaves, seconds = self.engine.run(kind, fmt, chunk)
                parts.append(leaves)
                timings.append((seconds, len(chunk)))
            leaves = [_concat([p[j] for p in parts]) for j in range(len(parts[0]))]
            seconds = sum(s for s, _ in timings)
            start = 0
            for i in idx:
                n = len(items[i][2])
                out[i] = ([leaf_rows(leaf, start, n) for leaf in leaves],
                          {"generation_s": seconds, "batch_rows": len(x), "queue_s": None})
                start += n
        return out

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        from duet_jax.serving import codec

        body = await request.body()
        try:
            req = codec.parse_request(body, request.headers.get("content-type"),
                                      request.headers.get("accept"), self.limits)
        except codec.RequestError as err:
            return JSONResponse({"error": {"kind": "bad_request", "field": err.field,
                                           "message": err.message}}, status_code=400)
        leaves, timing = await self._batched((req.kind, req.fmt, req.x))
        content, media = codec.encode_response(
            leaves, req.fmt, req.binary, {**self.meta, "rows": len(req.x), "timing": timing})
        return Response(content, media_type=media)


def _rows(items: list) -> int:
    return sum(len(item[2]) for item in items)


def _concat(xs: list):
    if isinstance(xs[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*xs, strict=True))
    return np.concatenate(xs)


def deployment(checkpoint: str, replicas: int = 1, cpus_per_replica: float = 1.0,
               max_concurrent: int = 256, **kwargs):
    """The bound Ray Serve application of :class:`Generator` (``serve.run`` it)."""
    from ray import serve

    return serve.deployment(Generator, name="duet_generator", num_replicas=replicas,
                            ray_actor_options={"num_cpus": cpus_per_replica},
                            max_ongoing_requests=max_concurrent).bind(
                                checkpoint, cpus_per_replica=cpus_per_replica, **kwargs)


def main(argv):
    cli.start(argv)
    import ray
    from ray import serve

    from duet_jax.errors import ConfigError
    from duet_jax.serving.engine import load_run

    if not _CHECKPOINT.value:
        raise ConfigError("--checkpoint", None, "a DUET run directory")
    load_run(_CHECKPOINT.value)  # a bad checkpoint fails here, in one line, not in a replica
    ray.init(address=_ADDRESS.value)
    serve.start(http_options={"host": _HOST.value, "port": _PORT.value})
    app = deployment(_CHECKPOINT.value, _REPLICAS.value, _CPUS.value,
                     max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT_MS.value,
                     pin_cores=_PIN.value)
    serve.run(app, name="duet", route_prefix="/v1/generate")
    # Ray's own handlers do not stop this driver cleanly: wait for Ctrl-C or SIGTERM here
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving on http://{_HOST.value}:{_PORT.value}/v1/generate with "
          f"{_REPLICAS.value} replica(s); Ctrl-C stops", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


run = cli.entry_point(main)

if __name__ == "__main__":
    run()
