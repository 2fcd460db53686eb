"""The paper's comparison: Base vs on-device fine-tuning vs DUET, over datasets, models, seeds.

    python -m experiments.paper_table --datasets=movielens_100k,amazon_cds:quick \\
        --models=sasrec,gru4rec,din --seeds=3 --workdir=results/paper

Every (dataset, model, seed) *cell* trains Base and DUET, fine-tunes Base on every device
(:mod:`duet_jax.finetune`), selects each on validation and evaluates device-test once; the
cells named by ``--ablation`` also train the DUET ablations (frozen decoders, stabiliser over
candidates or rows, two-stage, low-rank). A dataset may carry its config variant after a
colon (``amazon_cds:quick``); ``--set train.num_epochs=4`` overrides a field in every cell.

Outputs in ``--workdir``: ``paper_table.{md,json,csv}``, ``ablation.md``, ``paper_auc.png``,
and per cell ``cells/<dataset>/<model>/seed<k>/rows.json``. The command resumes: a cell with a
``rows.json`` written under the same config is not recomputed, and a cell interrupted midway
resumes from its orbax checkpoints.
"""

from __future__ import annotations

import importlib
import json
import os
import time

from absl import app, flags

from duet_jax import cache
from experiments import cli, experiment, paper_report, report
from experiments import config as config_lib
from experiments.config import apply_overrides

_DATASETS = flags.DEFINE_list(
    "datasets",
    ["movielens_100k", "amazon_cds:quick", "amazon_beauty:quick", "douban_book"],
    "Datasets (config names in experiments/configs), each optionally ':variant'.",
)
_MODELS = flags.DEFINE_list("models", ["sasrec", "gru4rec", "din"], "Device models.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 per (dataset, model).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/paper_table", "Output directory.")
_ABLATION = flags.DEFINE_list(
    "ablation",
    ["movielens_100k/sasrec"],
    "dataset/model pairs whose cells also train the DUET ablations ('' for none).",
)
_SET = flags.DEFINE_multi_string(
    "set", [], "Config override for every cell, e.g. --set=train.num_epochs=4 (repeatable)."
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only rebuild the tables from finished cells; train nothing."
)

MAIN_METHODS = "base,finetune,duet"
ABLATIONS = ",".join(paper_report.ABLATION_METHODS[1:])


def cell_config(dataset_spec: str, model: str, seed: int, ablation: bool, overrides: list[str]):
    """The experiment config of one cell."""
    name, _, variant = dataset_spec.partition(":")
    try:
        module = importlib.import_module(f"experiments.configs.{name}")
    except ModuleNotFoundError:
        raise app.UsageError(
            f"--datasets: no config experiments/configs/{name}.py "
            f"(known: {', '.join(config_lib.DATASETS)})"
        ) from None
    config = module.get_config(variant) if variant else module.get_config()
    config.model = model
    config.seed = seed
    config.methods = MAIN_METHODS + ("," + ABLATIONS if ablation else "")
    apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def cell_dir(workdir: str, dataset_spec: str, model: str, seed: int) -> str:
    return os.path.join(workdir, "cells", dataset_spec.replace(":", "_"), model, f"seed{seed}")


# config.data fields added after the committed cells were made, with the values that make
# exactly the samples made before they existed (tests/data/test_samples.py checks that the
# defaults reproduce the old arrays): a cell at these values keeps its identity.
LATER_DATA_FIELDS = {"train_lags": [0], "eval_lags": [], "eval_once": False}


def cell_identity(config) -> dict:
    """What a cell's results depend on: the config less the method list (checked row by row),
    progress bars and file locations."""
    identity = cache.canonical(config.to_dict())
    for name, default in LATER_DATA_FIELDS.items():  # see LATER_DATA_FIELDS
        if identity["data"].get(name) == default:
            identity["data"].pop(name)
    identity.pop("methods", None)
    identity["train"].pop("progress", None)
    for name in config_lib.REAL_SOURCE_FIELDS:
        identity["data"].pop(name, None)
    return identity


def legacy_metrics(row: dict) -> dict:
    """A row as today's metric names read it. Rows stored before ``recall@K`` existed hold
    under ``hr@K`` what is now ``recall@K`` (hits / min(K, positives)); today's ``hr@K``
    (a 0/1 hit) was not computed for them, so it is None."""
    if any(k.startswith("hr@") for k in row) and not any(k.startswith("recall@") for k in row):
        row = dict(row)
        for key in [k for k in row if k.startswith("hr@")]:
            row["recall@" + key[3:]] = row.pop(key)
            row[key] = None
    return row


def load_cell(path: str, identity: dict, methods: tuple[str, ...],
              partial: bool = False) -> list[dict] | None:
    """The rows of a finished cell: None if absent, written under another config, or
    missing one of ``methods`` (unless ``partial``: then whatever rows it has)."""
    stored = cache.load_record(os.path.join(path, "rows.json"), identity, key="rows")
    if stored is None:
        return None
    rows = [legacy_metrics(r) for r in stored if r["method"] in methods]
    complete = {r["method"] for r in rows} == set(methods)
    return rows if complete or (partial and rows) else None


def cell_machine(path: str) -> dict:
    """Where a finished cell ran: its stored processor, core count, backend and code version
    (the cell's own record; the report may be rebuilt elsewhere)."""
    with open(os.path.join(path, "rows.json")) as f:
        env = json.load(f).get("environment", {})
    return {k: env.get(k) for k in ("processor", "cpu_count", "jax_backend", "code")}


def main(argv):
    cli.start(argv)
    workdir = _WORKDIR.value
    ablation = {tuple(p.split("/", 1)) for p in _ABLATION.value if p}
    cells = [
        (d, m, s, (d.partition(":")[0], m) in ablation)
        for d in _DATASETS.value for m in _MODELS.value for s in range(_SEEDS.value)
    ]
    configs = {c[:3]: cell_config(*c, _SET.value) for c in cells}  # fail early on bad input
    rows, missing, data_cache, machines = [], [], {}, {}
    for dataset, model, seed, _ in cells:
        config = configs[(dataset, model, seed)]
        path = cell_dir(workdir, dataset, model, seed)
        label = f"{dataset} / {model} / seed {seed}"  # how the report names the cell
        identity = cell_identity(config)
        methods = config_lib.methods(config)
        done = load_cell(path, identity, methods, partial=_REPORT_ONLY.value)
        if done is None and not _REPORT_ONLY.value:
            print(f"cell {label}", flush=True)
            key = (dataset, json.dumps(identity["data"], sort_keys=True))
            if key not in data_cache:
                data_cache.clear()  # one dataset's samples in memory at a time
                data_cache[key] = experiment.load_data(config, workdir)
            started = time.perf_counter()
            done = experiment.run(config, path, data=data_cache[key])
            cache.save_record(
                os.path.join(path, "rows.json"), identity, done, key="rows",
                config=config.to_dict(),
                wall_seconds=round(time.perf_counter() - started, 1),
                environment=report.environment(),
            )
        if done is None:
            missing.append(label)
            continue
        rows.extend({**r, "dataset": dataset} for r in done)
        machines[label] = cell_machine(path)
    meta = {
        "command": "python -m experiments.paper_table " + " ".join(
            f"--{n}={','.join(v) if isinstance(v, list) else v}"
            for n, v in (("datasets", _DATASETS.value), ("models", _MODELS.value),
                         ("seeds", _SEEDS.value), ("workdir", workdir),
                         ("ablation", _ABLATION.value))
        ) + "".join(f" --set={s}" for s in _SET.value),
        "cells": len(cells),
        "missing": missing,
        # the cells' own machines (their metrics and adaptation times come from there), and
        # the machine that wrote these tables
        "cell_machines": machines,
        "environment": report.environment(),
    }
    print(paper_report.write_tables(workdir, rows, meta))
    print(f"written to {os.path.abspath(workdir)}/paper_table.{{md,json,csv}}, paper_auc.png")


run = cli.entry_point(main)  # the console script

if __name__ == "__main__":
    run()
