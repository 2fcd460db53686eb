"""DUET as a network service: a FastAPI generation server with dynamic batching, its wire
format, and clients (``docs/serving.md``).

- :mod:`~duet_jax.serving.engine`: load a trained run, batched jitted generation.
- :mod:`~duet_jax.serving.codec`: request/response bodies (JSON, msgpack) and validation.
- :mod:`~duet_jax.serving.batcher`: the asyncio dynamic batcher (bounded queue).
- :mod:`~duet_jax.serving.app`: the app: ``/v1/generate``, ``/healthz``, ``/readyz``,
  ``/metrics``.
- :mod:`~duet_jax.serving.client`: an httpx client and ``RemoteCloud`` for the fleet.

Needs the ``serve`` extra (fastapi, uvicorn, httpx, msgpack, prometheus_client).
"""

from duet_jax.serving.app import ServerConfig, create_app
from duet_jax.serving.client import GenerationClient, RemoteCloud, ServerError
from duet_jax.serving.engine import Engine, LoadedRun, load_run

__all__ = ["Engine", "GenerationClient", "LoadedRun", "RemoteCloud", "ServerConfig",
           "ServerError", "create_app", "load_run"]
