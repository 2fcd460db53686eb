"""Does DUET adapt devices? The grid of controls, deployment variants and paired statistics.

    python -m experiments.adapt_grid --datasets=movielens_100k,amazon_cds,amazon_beauty \\
        --models=sasrec,gru4rec,din --seeds=3 --workdir=results/adaptation

Every (dataset, model, seed) *cell* (:mod:`experiments.adapt_cell`) trains Base, the
capacity-matched ``base_wide`` and DUET with early stopping and a learning rate chosen on
validation, fine-tunes Base on every device (head and all parameters), and scores
device-test per request at each sync lag, once per device, and under the shuffled-trigger
and mean-z controls. Evaluation negatives are drawn with the cell's seed.

Outputs in ``--workdir``: per cell ``cells/<dataset>/<model>/seed<k>/cell.json`` and
``predictions/`` (every per-row logit); ``adaptation.{md,json}`` (the table with paired
per-user bootstrap CIs), ``lags.png`` (AUC vs sync lag) and ``drift.png`` (DUET's gain by
drift quartile). The command resumes: finished cells are reused when their config matches,
and an interrupted cell resumes from its checkpoints.

The report covers every finished cell of the workdir, not only the cells this command was
asked for: workers that split the grid (``--datasets``, ``--models``, ``--seeds``) in one
workdir each leave the whole report, with the cells still missing from the rectangle of
datasets x models x seeds they span and the reproducing command for that rectangle.
"""

from __future__ import annotations

import glob
import importlib
import itertools
import os
import re
import time

from absl import app, flags

from duet_jax import cache, files
from duet_jax.errors import ConfigError
from experiments import adapt_cell, adapt_report, cli, experiment, report
from experiments import config as config_lib
from experiments.config import apply_overrides

_DATASETS = flags.DEFINE_list("datasets", ["movielens_100k", "amazon_cds", "amazon_beauty"],
                              "Datasets (config names in experiments/configs).")
_MODELS = flags.DEFINE_list("models", ["sasrec", "gru4rec", "din"], "Device models.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 per (dataset, model).")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "Run seeds first_seed..seeds-1 only.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/adaptation", "Output directory.")
_LRS = flags.DEFINE_list("learning_rates", ["1e-3", "3e-3"],
                         "Learning rates tried for Base, base_wide and DUET (chosen on val).")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 30, "Epoch budget; early stopping ends sooner.")
_PATIENCE = flags.DEFINE_integer("patience", 3, "Epochs without validation gain before stopping.")
_LAGS = flags.DEFINE_list("lags", ["0", "5", "20"], "Sync lags scored on device-test.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per comparison.")
_FT_SELECTION = flags.DEFINE_integer(
    "finetune_selection_devices", adapt_cell.CellOptions.finetune_selection_devices,
    "Devices fine-tuning's selection stage samples (0 = all); its test stage runs all.")
_SET = flags.DEFINE_multi_string("set", [], "Config override for every cell (repeatable).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only rebuild the report from finished cells; train nothing.")


def cell_config(dataset: str, model: str, seed: int, overrides: list[str]):
    """The experiment config of one cell: the dataset's full config (no ``:quick``), early
    stopping, evaluation negatives drawn with the cell's seed."""
    try:
        module = importlib.import_module(f"experiments.configs.{dataset}")
    except ModuleNotFoundError:
        raise app.UsageError(f"--datasets: no config experiments/configs/{dataset}.py") from None
    config = module.get_config()
    config.model = model
    config.seed = seed
    config.data.seed = seed  # negatives resampled per seed
    config.methods = "base,duet"
    config.train.num_epochs = _MAX_EPOCHS.value
    config.train.patience = _PATIENCE.value
    config.train.progress = False
    apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def cell_options() -> adapt_cell.CellOptions:
    if _FT_SELECTION.value < 0:
        raise app.UsageError(f"--finetune_selection_devices={_FT_SELECTION.value}: expected "
                             "an integer >= 0 (0 = every device)")
    try:
        return adapt_cell.CellOptions(learning_rates=tuple(float(v) for v in _LRS.value),
                                      lags=tuple(int(v) for v in _LAGS.value),
                                      finetune_selection_devices=_FT_SELECTION.value)
    except ValueError as err:
        raise app.UsageError(f"--learning_rates/--lags: {err}") from None


def cell_path(workdir: str, dataset: str, model: str, seed: int) -> str:
    return os.path.join(workdir, "cells", dataset, model, f"seed{seed}")


def finished_cells(workdir: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """The cells of ``workdir`` that have a ``cell.json``, as ``(dataset, model, seed)``, and
    the ones this grid cannot report (no dataset config, a model or config the code refuses,
    a directory not named ``seed<k>``), each with the reason."""
    found, ignored = [], []
    for record in sorted(glob.glob(os.path.join(workdir, "cells", "*", "*", "*", "cell.json"))):
        path = os.path.dirname(record)
        model_dir, seed_dir = os.path.split(path)
        dataset_dir, model = os.path.split(model_dir)
        dataset = os.path.basename(dataset_dir)
        match = re.fullmatch(r"seed(\d+)", seed_dir)
        if match is None:
            ignored.append(f"{path} (not a seed<k> directory)")
            continue
        try:
            cell_config(dataset, model, 0, [])
        except (app.UsageError, ConfigError) as err:
            ignored.append(f"{path} ({err})")
            continue
        found.append((dataset, model, int(match.group(1))))
    return found, ignored


def report_scope(requested: list[tuple[str, str, int]], found: list[tuple[str, str, int]]
                 ) -> tuple[list[str], list[str], range]:
    """The grid a report covers: the datasets, models and seeds of the requested cells and of
    the finished ones in the workdir, as one rectangle (datasets and models in the order
    asked, then the others sorted). A command that runs part of the grid in a shared workdir
    (workers splitting it) thus reports every finished cell, not its part alone, and lists
    what the rectangle still misses."""
    def ordered(index):
        asked = list(dict.fromkeys(c[index] for c in requested))
        return asked + sorted({c[index] for c in found} - set(asked))

    seeds = {c[2] for c in requested} | {c[2] for c in found}
    return ordered(0), ordered(1), range(min(seeds), max(seeds) + 1) if seeds else range(0)


def main(argv):
    cli.start(argv)
    workdir = _WORKDIR.value
    options = cell_options()
    cells = [(d, m, s) for d in _DATASETS.value for m in _MODELS.value
             for s in range(_FIRST_SEED.value, _SEEDS.value)]
    configs = {c: cell_config(*c, _SET.value) for c in cells}  # fail early on bad input

    def identities(dataset, model, seed):
        identity = {"config": configs[(dataset, model, seed)].to_dict(),
                    "options": options.__dict__, "protocol": adapt_cell.PROTOCOL_VERSION}
        # fields added to the code since a cell was written take their defaults there
        defaults = {"config": cell_config(dataset, model, seed, []).to_dict(),
                    "options": adapt_cell.CellOptions().__dict__}
        return identity, defaults

    def finished(dataset, model, seed):
        identity, defaults = identities(dataset, model, seed)
        return cache.load_record(os.path.join(cell_path(workdir, dataset, model, seed),
                                              "cell.json"),
                                 identity, key="cell", defaults=defaults)

    done = {}
    for dataset, model, seed in cells:
        path = cell_path(workdir, dataset, model, seed)
        record = finished(dataset, model, seed)
        if record is None and not _REPORT_ONLY.value:
            print(f"cell {dataset} / {model} / seed {seed}", flush=True)
            started = time.perf_counter()
            config = configs[(dataset, model, seed)]
            data = experiment.load_data(config, workdir)
            record = adapt_cell.run_cell(config, path, data, options)
            identity, _ = identities(dataset, model, seed)
            cache.save_record(os.path.join(path, "cell.json"), identity, record, key="cell",
                              wall_seconds=round(time.perf_counter() - started, 1),
                              environment=report.environment())
        if record is not None:
            done[(dataset, model, seed)] = (path, record)

    # the report covers every finished cell of the workdir, not this command's part alone
    found, ignored = finished_cells(workdir)
    datasets, models, seeds = report_scope(cells, found)
    missing = []
    for cell in itertools.product(datasets, models, seeds):
        if cell not in configs:
            configs[cell] = cell_config(*cell, _SET.value)
        if cell not in done:
            record = finished(*cell)
            if record is None:  # not run yet, or made with other settings: rerun by the command
                missing.append(" / ".join((cell[0], cell[1], f"seed {cell[2]}")))
                continue
            done[cell] = (cell_path(workdir, *cell), record)
    command = "python -m experiments.adapt_grid " + " ".join(
        f"--{n}={','.join(v) if isinstance(v, list) else v}"
        for n, v in (("datasets", datasets), ("models", models), ("seeds", seeds.stop),
                     *((("first_seed", seeds.start),) if seeds.start else ()),
                     ("workdir", workdir),
                     ("learning_rates", _LRS.value), ("max_epochs", _MAX_EPOCHS.value),
                     ("patience", _PATIENCE.value), ("lags", _LAGS.value),
                     ("finetune_selection_devices", _FT_SELECTION.value))
    ) + "".join(f" --set={s}" for s in _SET.value)
    with files.workdir_lock(workdir, wait=True):  # workers finishing together take turns
        text = adapt_report.write_report(workdir, done, missing, command, _BOOTSTRAP.value,
                                         ignored)
    print(text)


run = cli.entry_point(main)  # the console script

if __name__ == "__main__":
    run()
