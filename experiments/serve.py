"""Generation server: serve a trained DUET over HTTP (FastAPI on uvicorn).

    python -m experiments.serve --checkpoint=runs/synthetic/duet --port=8000

``--checkpoint`` is a DUET method's run directory (``WORKDIR/<method>`` of the main,
fleet or paper-table job), or ``--exported`` a directory written by
``python -m duet_jax.export``. The server compiles every batch bucket before ``/readyz``
answers 200; SIGTERM or Ctrl-C stops taking connections, finishes in-flight requests and
exits. See docs/serving.md.
"""

from __future__ import annotations

import logging

from absl import flags

from duet_jax import delivery
from duet_jax.cloud import UPLOADS
from duet_jax.errors import ConfigError
from duet_jax.xla_options import CPU_VECTOR_WIDTH, VECTOR_WIDTHS
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A DUET run directory (WORKDIR/<method>).")
_EXPORTED = flags.DEFINE_string("exported", None,
                                "Instead of --checkpoint: a jax.export directory "
                                "(python -m duet_jax.export); no model code is used.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "Rows per batched call and per request.")
_MIN_BUCKET = flags.DEFINE_integer("min_bucket", 1, "Smallest padded batch (power of two).")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 2.0,
                                  "How long a batch waits for more requests after its first.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Waiting requests; more are answered 503.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body.")
_UPLOADS = flags.DEFINE_list("uploads", list(UPLOADS), "Upload kinds served (ids, z).")
_FORMATS = flags.DEFINE_list("formats", list(delivery.FORMATS), "Delivery formats served.")
_INLINE = flags.DEFINE_bool("inline_generation", False,
                            "Generate on the event loop's thread, not a worker thread: "
                            "fewer thread hand-offs, better on a few busy CPU cores.")
_VECTOR_WIDTH = flags.DEFINE_integer(
    "cpu_vector_width", CPU_VECTOR_WIDTH,
    "On CPU, LLVM's preferred vector width in bits for generation (0 = XLA's default, 256).")
_GRACE = flags.DEFINE_integer("graceful_shutdown_s", 30,
                              "On SIGTERM, how long in-flight requests may take.")


def build_engine():
    """The engine the flags describe (raises ConfigError for a bad flag or checkpoint)."""
    from duet_jax.serving.engine import Engine, load_run

    if bool(_CHECKPOINT.value) == bool(_EXPORTED.value):
        raise ConfigError("--checkpoint", _CHECKPOINT.value,
                          "exactly one of --checkpoint or --exported")
    for name, values, allowed in (("--uploads", _UPLOADS.value, UPLOADS),
                                  ("--formats", _FORMATS.value, delivery.FORMATS)):
        if not values or any(v not in allowed for v in values):
            raise ConfigError(name, ",".join(values), f"a list from {list(allowed)}")
    if _MAX_BATCH.value < 1 or _MIN_BUCKET.value < 1:
        raise ConfigError("--max_batch", _MAX_BATCH.value, "max_batch and min_bucket >= 1")
    if _VECTOR_WIDTH.value not in VECTOR_WIDTHS:
        raise ConfigError("--cpu_vector_width", _VECTOR_WIDTH.value,
                          f"one of {list(VECTOR_WIDTHS)} (bits; 0 = XLA's default)")
    kwargs = {"max_batch": _MAX_BATCH.value, "min_bucket": _MIN_BUCKET.value,
              "uploads": tuple(_UPLOADS.value), "formats": tuple(_FORMATS.value),
              "vector_width": _VECTOR_WIDTH.value}
    if _EXPORTED.value:
        from duet_jax.export import ExportedEngine

        return ExportedEngine(_EXPORTED.value, **kwargs)
    return Engine(load_run(_CHECKPOINT.value), **kwargs)


def main(argv):
    cli.start(argv)
    import uvicorn

    from duet_jax.serving import ServerConfig, create_app

    engine = build_engine()
    config = ServerConfig(max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT_MS.value,
                          max_queue=_MAX_QUEUE.value, max_body_bytes=_MAX_BODY.value,
                          inline_generation=_INLINE.value)
    logging.getLogger("duet_jax.serving").setLevel(logging.WARNING)
    print(f"serving {engine.version} on http://{_HOST.value}:{_PORT.value} "
          f"(ready once {len(engine.buckets())} buckets are compiled)", flush=True)
    uvicorn.run(create_app(engine, config), host=_HOST.value, port=_PORT.value,
                log_level="warning", timeout_graceful_shutdown=_GRACE.value)


run = cli.entry_point(main)  # the console script duet-serve

if __name__ == "__main__":
    run()
