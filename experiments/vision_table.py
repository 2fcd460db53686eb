"""The vision comparison over seeds: mean +- std per method, per-device paired bootstrap
intervals (DUET vs Base, DUET vs base_wide, ...), a markdown table, CSV, JSON and a PNG.

    python -m experiments.vision_table --config=experiments/configs/digits.py --seeds=3 \\
        --workdir=results/vision

Each seed is one run of the vision job (:mod:`experiments.vision`), stored as
``seed<k>/results.json``; a seed whose stored run has the same config is not recomputed
(``--only_seed=k`` runs one seed, e.g. to run seeds in separate processes; ``--report_only``
rebuilds the tables from the stored runs). Outputs: ``vision_table.{md,json,csv}`` and
``vision_accuracy.png``.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.vision_report import aggregate, run_seed, write

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "digits.py"),
    "Vision job config (task = 'vision').", lock_config=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1.")
_ONLY_SEED = flags.DEFINE_integer("only_seed", None, "Run this seed only (no table).")
_WORKDIR = flags.DEFINE_string("workdir", "results/vision", "Output directory.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the tables.")


def main(argv):
    cli.start(argv)
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _ONLY_SEED.value is not None:
        run_seed(config, _ONLY_SEED.value, workdir)
        return
    results = []
    for seed in range(_SEEDS.value):
        if _REPORT_ONLY.value:
            with open(os.path.join(workdir, f"seed{seed}", "results.json")) as f:
                results.append(json.load(f))
        else:
            results.append(run_seed(config, seed, workdir))
    agg = aggregate(results, config.get("bootstrap_resamples", 1000))
    print(write(agg, workdir))
    print(f"written to {os.path.abspath(workdir)}/vision_table.{{md,json,csv}}, "
          "vision_accuracy.png")


run = cli.entry_point(main)

if __name__ == "__main__":
    run()
