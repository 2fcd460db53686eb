"""The generation server as a FastAPI app (run it with uvicorn: ``experiments/serve.py``).

Endpoints:

- ``POST /v1/generate``: a trigger (``ids`` or ``z``) -> heads in a delivery format
  (:mod:`duet_jax.serving.codec` documents the bodies). 400 names the bad field; 503 with
  ``Retry-After`` when the queue is full or the server is not ready yet or shutting down.
- ``GET /v1/model``: version, head layout, sizes, what is accepted.
- ``GET /healthz``: the process answers. ``GET /readyz``: 200 only once every batch bucket
  has been compiled (warm-up runs in the background after start-up).
- ``GET /metrics``: Prometheus text (requests by status, rows, batch sizes, queue depth,
  request latency and generation time histograms, errors by kind).

Shutdown (uvicorn on SIGTERM/SIGINT) stops taking connections, lets in-flight requests
finish, then the app's lifespan drains the batcher's queue before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import prometheus_client as prom
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from duet_jax.serving import codec
from duet_jax.serving.batcher import Closed, DynamicBatcher, QueueFull

log = logging.getLogger("duet_jax.serving")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Batching and admission settings (``experiments/serve.py`` flags of the same names)."""

    max_batch: int = 64  # rows per batched call (and per request)
    max_wait_ms: float = 2.0  # how long a batch waits for more requests after its first
    max_queue: int = 256  # requests waiting; one more is answered 503
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # Retry-After on 503
    warm_up: bool = True  # compile every bucket before /readyz says ready
    # generate on the event loop's thread instead of a worker thread (DynamicBatcher)
    inline_generation: bool = False


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps per process)."""

    def __init__(self, batcher_depth, max_batch: int):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("duet_requests", "generate requests by HTTP status",
                                     ["status"], registry=r)
        self.rows = prom.Counter("duet_rows", "heads generated (request rows)", registry=r)
        sizes = [2 ** i for i in range(max(max_batch, 1).bit_length() + 1)]
        self.batch_rows = prom.Histogram("duet_batch_rows", "rows per batched generation call",
                                         buckets=sizes, registry=r)
        self.generation = prom.Histogram(
            "duet_generation_seconds", "seconds per batched generation call",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r)
        self.latency = prom.Histogram(
            "duet_request_latency_seconds", "generate requests: body read to answer",
            buckets=(5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.errors = prom.Counter("duet_errors", "failed generate requests by kind", ["kind"],
                                   registry=r)
        self.queue = prom.Gauge("duet_queue_depth", "requests waiting for a batch", registry=r)
        self.queue.set_function(batcher_depth)
        self.ready = prom.Gauge("duet_ready", "1 once warm-up has compiled every bucket",
                                registry=r)
        self.info = prom.Info("duet_model", "the served model", registry=r)

    def on_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.generation.observe(seconds)
        self.rows.inc(rows)


def _error(status: int, kind: str, field: str, message: str, retry_after: int | None = None
           ) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"kind": kind, "field": field, "message": message}},
                        status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (field ``body``) past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise codec.RequestError("body", f"{declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise codec.RequestError("body", f"more than {limit} bytes; at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app serving ``engine`` (:class:`duet_jax.serving.engine.Engine` or
    :class:`duet_jax.export.ExportedEngine`): anything with ``run(kind, fmt, x)``,
    ``warm_up()``, ``version``, ``layout``, ``seq_len``, ``num_items``, ``z_dim``,
    ``uploads``, ``formats`` and ``buckets()``."""
    if config.max_batch > engine.max_batch:
        raise ValueError(f"max_batch {config.max_batch} > the engine's {engine.max_batch}")
    batcher = DynamicBatcher(engine.run, config.max_batch, config.max_wait_ms / 1e3,
                             config.max_queue, inline=config.inline_generation)
    metrics = Metrics(batcher.depth, config.max_batch)
    batcher.on_batch = metrics.on_batch
    metrics.info.info({"version": engine.version})
    limits = codec.Limits(engine.seq_len, engine.num_items, engine.z_dim, config.max_batch,
                          config.max_body_bytes, engine.uploads, engine.formats)
    state = {"ready": False, "warmup_s": None, "warmup_error": None}
    meta = {"version": engine.version, "layout": engine.layout.to_json()}

    async def warm_up() -> None:
        try:
            if config.warm_up:
                loop = asyncio.get_running_loop()
                state["warmup_s"] = await loop.run_in_executor(None, engine.warm_up)
            state["ready"] = True
            metrics.ready.set(1)
            log.warning("ready: %s (warm-up %.1f s)", engine.version, state["warmup_s"] or 0)
        except Exception as err:  # stays not ready; /readyz says why
            state["warmup_error"] = f"{type(err).__name__}: {err}"
            log.exception("warm-up failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        task = asyncio.get_running_loop().create_task(warm_up())
        yield
        state["ready"] = False
        metrics.ready.set(0)
        if not task.done():
            await task  # an XLA compile cannot be interrupted; let it end
        await batcher.close()  # answer everything queued

    app = FastAPI(title="DUET generation server", version="1", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.engine = batcher, metrics, engine
    app.state.serving = state

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"ready": state["ready"], "version": engine.version,
                "buckets": engine.buckets(), "warmup_s": state["warmup_s"]}
        if state["warmup_error"]:
            body["error"] = state["warmup_error"]
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(prom.generate_latest(metrics.registry),
                        media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model() -> dict:
        return {**meta, "seq_len": engine.seq_len, "num_items": engine.num_items,
                "z_dim": engine.z_dim, "uploads": list(engine.uploads),
                "formats": list(engine.formats), "max_rows": config.max_batch}

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        response = await _generate(request)
        metrics.requests.labels(str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _generate(request: Request) -> Response:
        retry = config.retry_after_s
        try:
            body = await _read_body(request, config.max_body_bytes)
            if not state["ready"]:
                metrics.errors.labels("not_ready").inc()
                return _error(503, "not_ready", "", "warming up", retry)
            req = codec.parse_request(body, request.headers.get("content-type"),
                                      request.headers.get("accept"), limits)
            leaves, info = await batcher.submit(req.kind, req.fmt, req.x)
            doc = {**meta, "rows": len(req.x), "timing": dataclasses.asdict(info)}
            if req.binary:  # a few microseconds: a thread hop would cost more
                content, media = codec.encode_response(leaves, req.fmt, True, doc)
            else:  # nested lists of a large head take milliseconds: off the event loop
                content, media = await asyncio.to_thread(
                    codec.encode_response, leaves, req.fmt, False, doc)
            return Response(content, media_type=media,
                            headers={"X-Model-Version": engine.version})
        except codec.RequestError as err:
            metrics.errors.labels("bad_request").inc()
            return _error(400, "bad_request", err.field, err.message)
        except QueueFull as err:
            metrics.errors.labels("queue_full").inc()
            return _error(503, "queue_full", "", str(err), retry)
        except Closed as err:
            metrics.errors.labels("shutting_down").inc()
            return _error(503, "shutting_down", "", str(err), retry)
        except Exception as err:  # a bug or an XLA failure: answer, log, keep serving
            metrics.errors.labels("internal").inc()
            log.exception("generation failed")
            return _error(500, "internal", "", f"{type(err).__name__}: {err}")

    return app
