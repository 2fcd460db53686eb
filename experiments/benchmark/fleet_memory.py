"""Peak memory of the fleet simulation as the fleet grows, with heads kept or streamed.

    python -m experiments.benchmark.fleet_memory --devices=10000,100000,1000000 \\
        --keep_heads=False --out=DIR/fleet_memory.json

Each (devices, keep_heads) point runs in a fresh subprocess (peak RSS is per process): a
synthetic fleet of ``devices`` phones, each with ``events`` events of one positive and one
negative sample (random item ids over full windows of SASRec's L = 30, 10,000 items), a
randomly initialised SASRec DUET (accuracy is not the point), ``rounds`` rounds of the
``every_round`` policy, float32 delivery, no Base. Reported: peak RSS of the whole process,
wall seconds, requests, and the bytes a ``[devices, values]`` head table would take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DEVICES = flags.DEFINE_string("devices", "10000,100000", "comma-separated fleet sizes")
_KEEP = flags.DEFINE_string("keep_heads", "False", "comma-separated: True, False or both")
_EVENTS = flags.DEFINE_integer("events", 2, "events per device")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "rounds")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the fleet and the parameters")
_OUT = flags.DEFINE_string("out", None, "JSON file to write (all points)")


def synthetic_samples(devices: int, events: int, seq_len: int, num_items: int, seed: int):
    """A :class:`SampleSet` grouped by device in time order: event ``e`` of a device has
    ``click_seq`` = its items ``[e, e + L)``, a positive (the next item) and a negative."""
    from duet_jax.data.samples import SampleSet

    rng = np.random.default_rng(seed)
    items = rng.integers(1, num_items + 1, (devices, seq_len + events), dtype=np.int32)
    windows = np.stack([items[:, e:e + seq_len] for e in range(events)], axis=1)  # [U, E, L]
    seq = np.repeat(windows.reshape(devices * events, seq_len), 2, axis=0)
    pos = items[:, seq_len:seq_len + events].reshape(-1)
    neg = rng.integers(1, num_items + 1, devices * events, dtype=np.int32)
    target = np.stack([pos, neg], axis=1).reshape(-1)
    label = np.tile(np.array([1.0, 0.0], np.float32), devices * events)
    user = np.repeat(np.arange(devices, dtype=np.int32), 2 * events)
    return SampleSet(user=user, click_seq=seq, trigger_seq=seq, target=target, label=label)


def measure(devices: int, keep_heads: bool, events: int, rounds: int, seed: int) -> dict:
    """One point, in this process (see the module docstring)."""
    import jax

    from duet_jax import timing
    from duet_jax.duet import Duet
    from duet_jax.fleet import FleetConfig, Simulator, build_streams
    from duet_jax.models import ModelConfig, get_model

    started = time.perf_counter()
    model = get_model("sasrec", ModelConfig(num_items=10_000))
    duet = Duet.create(model)
    params = duet.init(jax.random.key(seed))
    samples = synthetic_samples(devices, events, model.config.seq_len, 10_000, seed)
    streams = build_streams(samples, num_rounds=rounds)
    config = FleetConfig(policies=("every_round",), formats=("float32",), base=False,
                         keep_heads=keep_heads, progress=False, max_bucket=4096,
                         score_batch_size=4096)
    sim = Simulator(streams, duet, params, config)
    run = sim.run_policy("every_round")
    return {
        "devices": devices, "keep_heads": keep_heads, "events_per_device": events,
        "rounds": rounds, "samples": len(samples),
        "requests": int(run.requests.sum()),
        "peak_rss_bytes": timing.peak_rss_bytes(),
        "head_table_bytes": 4 * devices * duet.spec.num_values,
        "wall_s": time.perf_counter() - started,
        "mean_logit": float(np.mean(run.logits["float32"])),
    }


def run_point(devices: int, keep_heads: bool, timeout_s: float = 3600) -> dict:
    """:func:`measure` in a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = json.dumps([devices, keep_heads, _EVENTS.value, _ROUNDS.value, _SEED.value])
    proc = subprocess.run([sys.executable, "-c", (
        "import json, sys; from experiments.benchmark.fleet_memory import measure; "
        "print(json.dumps(measure(*json.loads(sys.argv[1]))))"), args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"fleet memory point failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    del argv
    from duet_jax import files
    from experiments import report

    keeps = [v.strip() == "True" for v in _KEEP.value.split(",")]
    points = []
    for n in (int(v) for v in _DEVICES.value.split(",")):
        for keep in keeps:
            points.append(run_point(n, keep))
            print(json.dumps(points[-1]))
            if _OUT.value:
                files.write_text_atomic(_OUT.value, files.dumps(
                    {"points": points, "environment": report.environment()}))


if __name__ == "__main__":
    app.run(main)
