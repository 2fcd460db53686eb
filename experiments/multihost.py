"""The multi-host command-line flags shared by the entry points that can span hosts
(``experiments.benchmark``, ``experiments.fleet``), defined once here.

``--coordinator_address=HOST:PORT --num_processes=P --process_id=I`` on every host (or
``--coordinator_address=auto`` under Slurm, Kubernetes or Cloud TPU, where JAX reads them
from the environment); :func:`initialize` must run before anything touches a JAX backend.
"""

from __future__ import annotations

from absl import flags

from duet_jax import sharding

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0 (jax.distributed), or auto (Slurm, Kubernetes, TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def initialize() -> bool:
    """``jax.distributed.initialize`` from the flags (:func:`sharding.initialize_distributed`);
    False (nothing done) without ``--coordinator_address``."""
    return sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                           _PROCESS_ID.value)
