"""One process of the 2-process test (tests/test_multihost.py), or the single-process run it
is compared with:

    python -m tests.multihost_worker OUT_DIR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Sharded SASRec head generation (each process places only its share of the rows, then the
heads are gathered), the benchmark's scaling case and a small fleet simulation (its cloud's
mesh spans the processes); process 0 writes ``OUT_DIR/heads.npz``, ``OUT_DIR/scaling.json``,
``OUT_DIR/fleet.json`` (records) and ``OUT_DIR/fleet.npz`` (per-sample outputs).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

SIZES = dict(num_items=50, seq_len=7, embed_dim=8)
DEVICES = 24  # rows of the generation check: splits evenly over 1 or 2 processes


def main(out_dir: str, coordinator: str | None = None, num_processes: int = 1,
         process_id: int = 0) -> None:
    if coordinator:
        # CPU devices talk through gloo (the CPU client has no collectives otherwise)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from duet_jax import files, sharding  # after the config update, before any backend use

    sharding.initialize_distributed(coordinator, num_processes if coordinator else None,
                                    process_id if coordinator else None)
    from jax.experimental import multihost_utils

    from duet_jax.duet import Duet
    from duet_jax.models import ModelConfig, get_model
    from experiments.benchmark import scaling

    assert jax.process_count() == num_processes, jax.process_count()
    duet = Duet.create(get_model("sasrec", ModelConfig(**SIZES)))
    mesh = sharding.device_mesh()
    params = sharding.replicate(duet.init(jax.random.key(0)), mesh)
    seq = scaling.random_sequences(np.random.default_rng(1), DEVICES, SIZES["seq_len"],
                                   SIZES["num_items"])
    # every process made the same global rows; it places only its own contiguous share
    local = sharding.process_rows(seq)
    assert len(local) == DEVICES // num_processes
    rows = sharding.shard_devices(local, mesh)
    heads = sharding.sharded_generate(duet, mesh)(params, rows)
    assert all(sharding.is_split(leaf, mesh) for leaf in jax.tree.leaves(heads))
    gathered = multihost_utils.process_allgather(heads, tiled=True)
    # the same global batch (32 rows) however many processes share it
    row = scaling.measure(model="sasrec", **SIZES, devices=64,
                          per_accelerator_batch=32 // num_processes, repeats=1, seed=0)
    simulated, arrays = fleet(num_processes)
    if jax.process_index() == 0:  # process 0 writes the outputs
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(gathered)}
        np.savez(os.path.join(out_dir, "heads.npz"), **flat)
        files.write_text_atomic(os.path.join(out_dir, "scaling.json"), json.dumps(row))
        files.write_text_atomic(os.path.join(out_dir, "fleet.json"), json.dumps(simulated))
        np.savez(os.path.join(out_dir, "fleet.npz"), **arrays)
    if coordinator:
        jax.distributed.shutdown()


# Two simulations of the tiny synthetic fleet (tests/test_fleet.py's world, 3 rounds): raw ids
# with kept heads, and z uploads with streamed heads in chunks of max_bucket = 16 (several
# generation calls per round, and generation again while scoring).
FLEETS = {
    "ids": dict(policies=("every_round", "drift_threshold"), upload="ids", keep_heads=True),
    "z": dict(policies=("every_k_items",), upload="z", keep_heads=False, max_bucket=16),
}


def fleet(num_processes: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Every process runs the same simulations (same data, parameters and streams); each
    cloud's mesh spans the processes. -> ({"sizes", "records"}, per-sample arrays)."""
    from duet_jax.duet import Duet
    from duet_jax.fleet import FleetConfig, Simulator, build_streams
    from duet_jax.models import get_model
    from experiments import config as config_lib
    from experiments import experiment
    from tests.conftest import tiny_config

    config = tiny_config()
    data = experiment.load_data(config)
    duet = Duet.create(get_model("sasrec", config_lib.model_config(config, data.num_items)))
    params = duet.init(jax.random.key(3))
    streams = build_streams(data.test, num_rounds=3)
    samples = streams.samples
    round_of = np.full(len(samples), -1, np.int64)
    for r in range(streams.num_rounds):
        round_of[streams.round_samples(r)] = r
    arrays = {"user": samples.user, "label": samples.label, "round": round_of}
    c = duet.model.config
    sizes = {"embed_dim": c.embed_dim, "seq_len": c.seq_len, "num_heads": c.num_heads,
             "ffn_mult": c.ffn_mult, "hidden_dim": duet.generator.hidden_dim,
             "z_dim": duet.generator.z_dim}
    records = []
    for name, kw in FLEETS.items():
        fc = FleetConfig(**{"formats": ("float32",), "base": False, "min_bucket": 8,
                            "score_batch_size": 128, "progress": False, **kw})
        sim = Simulator(streams, duet, params, fc)
        assert sim.cloud.multihost == (num_processes > 1) and sim.cloud.shards == num_processes
        for policy in fc.policies:
            run = sim.run_policy(policy)
            records += [{"fleet": name, **rec} for rec in run.records]
            for field in ("staleness", "trigger_event", "requests"):
                arrays[f"{name}/{policy}/{field}"] = getattr(run, field)
            arrays[f"{name}/{policy}/logits"] = run.logits["float32"]
    return {"sizes": sizes, "records": records}, arrays


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 1:
        main(args[0])
    else:
        main(args[0], args[1], int(args[2]), int(args[3]))
