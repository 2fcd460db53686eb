"""Sharded head generation over 1..n accelerators (the benchmark's ``scaling`` case).

Weak scaling: each accelerator gets ``per_accelerator_batch`` devices per call, so a call on
an ``n``-accelerator mesh generates ``n * per_accelerator_batch`` heads; ``devices`` heads
are streamed in such calls and discarded. Fake CPU devices need a fresh process (the count
is fixed when JAX starts), so :func:`run_fake` re-runs this module as

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.benchmark.scaling '{json}'

which prints one JSON line: the measurement over all its (fake) devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax import sharding, timing
from duet_jax.duet import Duet
from duet_jax.models import ModelConfig, get_model

# the repository root: the subprocess imports experiments.* from there
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_sequences(rng: np.random.Generator, n: int, seq_len: int,
                     num_items: int, min_length: int = 1) -> np.ndarray:
    """``[n, seq_len]`` int32 item ids, right-padded with 0, lengths uniform in
    ``min_length..seq_len`` (``min_length = seq_len``: every trigger full)."""
    if not 1 <= min_length <= seq_len:
        raise ValueError(f"min_length={min_length}: expected 1..seq_len ({seq_len})")
    lengths = rng.integers(min_length, seq_len + 1, size=n)
    seq = rng.integers(1, num_items + 1, size=(n, seq_len), dtype=np.int32)
    seq[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0
    return seq


def random_sequences_on_device(key: jax.Array, n: int, seq_len: int,
                                num_items: int) -> jax.Array:
    """:func:`random_sequences`' distribution drawn with ``jax.random`` inside a jitted call:
    ``[n, seq_len]`` int32 ids, right-padded with 0, lengths uniform in 1..seq_len."""
    k_len, k_ids = jax.random.split(key)
    lengths = jax.random.randint(k_len, (n, 1), 1, seq_len + 1)
    ids = jax.random.randint(k_ids, (n, seq_len), 1, num_items + 1, dtype=jnp.int32)
    return jnp.where(jnp.arange(seq_len)[None, :] < lengths, ids, 0)


def measure(model: str, num_items: int, seq_len: int, embed_dim: int, devices: int,
            per_accelerator_batch: int, repeats: int, num_accelerators: int | None = None,
            seed: int = 0) -> dict:
    """Devices/s of sharded generation on a mesh of the first ``num_accelerators``."""
    mesh = sharding.device_mesh(num_accelerators)
    if jax.process_count() > 1 and mesh.size != jax.device_count():
        raise ValueError(f"num_accelerators={num_accelerators}: a multi-host run must use all "
                         f"{jax.device_count()} accelerators of its {jax.process_count()} "
                         "processes")
    duet = Duet.create(get_model(model, ModelConfig(num_items=num_items, seq_len=seq_len,
                                                    embed_dim=embed_dim)))
    params = sharding.replicate(duet.init(jax.random.key(seed)), mesh)
    batch = mesh.size * per_accelerator_batch
    calls = -(-devices // batch)
    seq = random_sequences(np.random.default_rng(seed), calls * batch, seq_len, num_items)
    # multi-host: every process made the same global rows and places only its own share
    batches = [sharding.shard_devices(sharding.process_rows(b), mesh)
               for b in seq.reshape(calls, batch, seq_len)]
    started = time.perf_counter()
    fn = sharding.sharded_generate(duet, mesh).lower(params, batches[0]).compile()
    compile_s = time.perf_counter() - started

    run = timing.pipelined_pass(fn, [(params, b) for b in batches])
    result = timing.time_pass(run, repeats, compile_s,
                              warmup=lambda: jax.block_until_ready(fn(params, batches[0])))
    # What was generated, reduced over every accelerator (of every process): equal, up to
    # float summation order, for any mesh size or process count over the same seed.
    checksum = jax.jit(lambda p, b: [sum(jnp.sum(f(leaf)) for leaf in jax.tree.leaves(
        duet.generate(p, b))) for f in (lambda x: x, jnp.abs)])
    total, magnitude = checksum(params, batches[0])
    return {
        "heads_checksum": float(total),  # sum of the first global batch's head values
        "heads_abs_checksum": float(magnitude),  # and of their magnitudes
        "processes": jax.process_count(),
        "accelerators": mesh.size,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "global_batch": batch,
        "num_devices": devices,
        "padded_devices": calls * batch,
        "devices_per_s": devices / result.median_s,
        "timing": result.summary(),
    }


def run_fake(count: int, kwargs: dict, timeout_s: float = 600) -> dict:
    """:func:`measure` in a subprocess with ``count`` fake CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    command = [sys.executable, "-m", "experiments.benchmark.scaling", json.dumps(kwargs)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"fake-device scaling run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
