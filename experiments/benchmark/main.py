"""The benchmark's command line: flags, the quick sizes, the run loop and ``benchmark.json``.

``python -m experiments.benchmark`` (or the ``duet-bench`` console script) runs :data:`run`.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from duet_jax import files, timing
from experiments import cli, multihost, report
from experiments.benchmark.cases import Bench, tasks
from experiments.benchmark.plots import plot
from experiments.benchmark.summary import summarise
from experiments.configs import benchmark as benchmark_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.abspath(benchmark_config.__file__),
    "Benchmark config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)

GPU_NOTE = "No GPU was lent to this run's task: CPU results only."


def resolve_config(config, overrides: dict):
    """``config`` with the quick sizes when ``quick`` is set, command-line overrides kept."""
    if not config.quick:
        return config
    config = benchmark_config.quick(config)
    for path, value in overrides.items():  # --config.x=... beats the quick sizes
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def run_benchmark(config, workdir: str) -> dict:
    """Run every case, writing ``benchmark.json`` after each (``complete`` at the end), then
    the summary and ``benchmark.png``; returns the payload."""
    started = time.time()
    load_start = list(os.getloadavg())
    bench = Bench(config)
    bench.peaks = {"matmul": timing.peak_matmul(config.peak_matmul_size),
                   "bandwidth": timing.peak_bandwidth(config.peak_bandwidth_mb)}
    gpu = any(d.platform == "gpu" for d in jax.devices())
    result = {
        "config": config.to_dict(),
        "environment": report.environment() | {
            "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count()},
        "gpu": {"lent": gpu, "note": None if gpu else GPU_NOTE},
        "peaks": bench.peaks,
        "load_average": {"start": load_start, "end": None},
        "cases": [],
        "complete": False,
    }
    path = os.path.join(workdir, "benchmark.json")
    write = jax.process_index() == 0  # multi-host: process 0 writes
    todo = tasks(bench)
    for label, thunk in tqdm(todo, desc="benchmark", unit="case", disable=not config.progress):
        logging.info("case %s", label)
        result["cases"].extend(thunk())
        if write:
            files.write_text_atomic(path, files.dumps(result))
    result["load_average"]["end"] = list(os.getloadavg())
    result["wall_s"] = time.time() - started
    result["summary"] = summarise(result["cases"], config)
    result["complete"] = True
    if write:
        files.write_text_atomic(path, files.dumps(result))
        plot(result, os.path.join(workdir, "benchmark.png"))
    return result


def main(argv):
    cli.start(argv)
    # before anything touches a JAX backend
    multihost.initialize()
    config = resolve_config(_CONFIG.value,
                            config_flags.get_override_values(flags.FLAGS["config"]))
    result = run_benchmark(config, _WORKDIR.value)
    for model, s in result["summary"]["models"].items():
        print(model, json.dumps(files.strict_json(s), default=str))
    print(f"benchmark written to {os.path.abspath(_WORKDIR.value)}/benchmark.{{json,png}}")


run = cli.entry_point(main)  # the console script
