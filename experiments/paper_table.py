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

Each ``rows.json`` records the fingerprint of the data it was made from (the raw file's
member, bytes and sha256, or each authors'-format file's; :func:`experiment.data_fingerprint`).
A cell whose data has changed since is moved to ``<cell>.stale`` and recomputed (with
``--report_only``: left out and listed as stale). A cell made before fingerprints existed
is checked once against the data: the samples are built and compared with the sample
fingerprint its runs recorded (:func:`samples_recorded`); when they match, the cell is
stamped with today's fingerprint and reused; when they differ, it is moved aside and
recomputed; when the data cannot be checked (``--report_only``, or the raw files are absent)
it is reported as "unverified (made before data fingerprints)"
in the log and the tables.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time

from absl import app, flags

from duet_jax import cache, files
from duet_jax.errors import DataError
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
              partial: bool = False, defaults: dict | None = None) -> list[dict] | None:
    """The rows of a finished cell: None if absent, written under another config, or
    missing one of ``methods`` (unless ``partial``: then whatever rows it has).

    ``defaults``: the identity of the cell under the code's default config (no ``--set``);
    fields a stored identity lacks (added to the code after the cell was made) are taken
    from it before comparing (:func:`duet_jax.cache.with_defaults`)."""
    stored = cache.load_record(os.path.join(path, "rows.json"), identity, key="rows",
                               defaults=defaults)
    if stored is None:
        return None
    rows = [legacy_metrics(r) for r in stored if r["method"] in methods]
    complete = {r["method"] for r in rows} == set(methods)
    return rows if complete or (partial and rows) else None


UNVERIFIED = "unverified (made before data fingerprints)"


def stored_fingerprint(path: str) -> tuple[bool, dict | None]:
    """``(has_one, fingerprint)``: the data fingerprint a cell's rows.json records."""
    stored = cache.read_json(os.path.join(path, "rows.json")) or {}
    return "data_fingerprint" in stored, stored.get("data_fingerprint")


def samples_recorded(path: str) -> str | None:
    """The sample fingerprint (sha256 of every sample array) the cell's runs recorded: its
    Base run's ``base/run_config.json``, or (older run configs hold the data config there
    instead) its fine-tuning record's identity, ``finetune/result.json``."""
    run_config = cache.read_json(os.path.join(path, "base", "run_config.json")) or {}
    if isinstance(run_config.get("data"), str):
        return run_config["data"]
    finetune = cache.read_json(os.path.join(path, "finetune", "result.json")) or {}
    recorded = (finetune.get("identity") or {}).get("data")
    return recorded if isinstance(recorded, str) else None


def stamp(path: str, fingerprint: dict | None, how: str) -> None:
    """Add the data fingerprint to a finished cell's rows.json (rows and identity kept)."""
    rows_path = os.path.join(path, "rows.json")
    stored = cache.read_json(rows_path)
    stored["data_fingerprint"] = fingerprint
    stored["data_verified"] = how
    files.write_text_atomic(rows_path, files.dumps(stored))


def set_aside(path: str) -> str:
    """Move a stale cell's directory to ``<cell>.stale[-k]`` (kept for inspection), so its
    recomputation starts afresh instead of resuming runs made from other data."""
    target, k = path + ".stale", 1
    while os.path.exists(target):
        k += 1
        target = f"{path}.stale-{k}"
    shutil.move(path, target)
    return target


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
    # each cell under the code's defaults: what fields added since a cell was made mean
    defaults = {c[:3]: cell_identity(cell_config(*c, [])) for c in cells}
    rows, missing, data_cache, machines = [], [], {}, {}
    unverified, stale, fingerprints = [], [], {}

    def fingerprint_of(dataset: str, config) -> tuple[bool, dict | None]:
        """``(known, fingerprint)`` of the cell's data; unknown when it cannot be read."""
        key = (dataset, json.dumps(cell_identity(config)["data"], sort_keys=True))
        if key not in fingerprints:
            try:
                fingerprints[key] = (True, experiment.data_fingerprint(config))
            except DataError as err:
                print(f"data of {dataset} cannot be read to check its cells: {err}",
                      flush=True)
                fingerprints[key] = (False, None)
        return fingerprints[key]

    def samples(dataset: str, config, identity: dict):
        key = (dataset, json.dumps(identity["data"], sort_keys=True))
        if key not in data_cache:
            data_cache.clear()  # one dataset's samples in memory at a time
            data_cache[key] = experiment.load_data(config, workdir)
        return data_cache[key]

    for dataset, model, seed, _ in cells:
        config = configs[(dataset, model, seed)]
        path = cell_dir(workdir, dataset, model, seed)
        label = f"{dataset} / {model} / seed {seed}"  # how the report names the cell
        identity = cell_identity(config)
        methods = config_lib.methods(config)
        done = load_cell(path, identity, methods, partial=_REPORT_ONLY.value,
                         defaults=defaults[(dataset, model, seed)])
        if done is not None:
            known, current = fingerprint_of(dataset, config)
            has, recorded = stored_fingerprint(path)
            if has and known and recorded != current:
                print(f"cell {label}: its data changed since it was made ({recorded} -> "
                      f"{current}); {'left out' if _REPORT_ONLY.value else 'recomputing'}",
                      flush=True)
                stale.append(label)
                done = None
            elif not has and known and not _REPORT_ONLY.value:
                built = samples(dataset, config, identity).fingerprint()
                if built == samples_recorded(path):
                    stamp(path, current, "samples fingerprint matched the one its runs "
                          "recorded")
                    print(f"cell {label}: made before data fingerprints; its samples match "
                          "today's data, stamped", flush=True)
                else:
                    print(f"cell {label}: made before data fingerprints, from other samples "
                          "than today's data gives (or none recorded); recomputing", flush=True)
                    stale.append(label)
                    done = None
            elif not has:
                print(f"cell {label}: {UNVERIFIED}", flush=True)
                unverified.append(label)
                done = [{**r, "data_verified": False} for r in done]
        if label in stale and not _REPORT_ONLY.value:
            print(f"cell {label}: its old results moved to {set_aside(path)}", flush=True)
        if done is None and not _REPORT_ONLY.value:
            print(f"cell {label}", flush=True)
            data = samples(dataset, config, identity)
            started = time.perf_counter()
            done = experiment.run(config, path, data=data)
            cache.save_record(
                os.path.join(path, "rows.json"), identity, done, key="rows",
                config=config.to_dict(),
                wall_seconds=round(time.perf_counter() - started, 1),
                environment=report.environment(),
                data_fingerprint=fingerprint_of(dataset, config)[1],
                data_verified="made from this data",
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
        "unverified": unverified,  # made before data fingerprints, data not checked
        "stale": stale,  # made from other data than today's (recomputed, or left out)
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
