"""One cell of the "does DUET adapt devices?" grid: a (dataset, model, seed) trained with the
full protocol, scored under every deployment variant and control, with per-row predictions.

What a cell does, in order:

1. Trains Base, ``base_wide`` (Base plus DUET's extra encoder feeding a static head, capacity
   matched) and DUET at each learning rate of the grid, with early stopping on validation
   (``config.train.patience``, at most ``config.train.num_epochs`` epochs), and keeps, per
   method, the learning rate whose best epoch scores highest on validation.
2. Fine-tunes Base on each device (head only and all parameters), with its grid of learning
   rates and step counts chosen on validation.
3. Scores device-test under each *variant* of the trigger a device would send: ``lag0``
   (per request, the current history: what Base reads too), ``lag5``/``lag20`` (the device
   synced k positions before the request) and ``once`` (one head per device from its history
   before the device period: the information fine-tuning has). Base's backbone reads the
   current history in every variant; only the generated head is stale.
4. Scores the test-time controls of the trained DUET: ``duet_shuffled`` (every device served
   another device's head) and ``duet_mean`` (every device served one population-average z).
5. Saves every per-row logit (``predictions/``: one compressed file per method and variant,
   so no file grows past a couple of MiB), per-user drift scores, and the metrics.

Nothing here is reused unless it was built from the same inputs (:mod:`duet_jax.cache`).
The record's ``stage_seconds`` says where the cell's time went: the wall seconds of each
stage in the process that finished the cell (a stage resumed from its checkpoints or cached
logits counts only what that process redid).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from duet_jax import cache, controls, drift, files, metrics
from duet_jax.data import samples as samples_lib
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.methods import score_at_test_time
from duet_jax.models import DeviceModel, get_model
from duet_jax.training import predict
from experiments import config as config_lib
from experiments import experiment

TRAINED = ("base", "base_wide", "duet")
CONTROLS = ("duet_shuffled", "duet_mean")  # test-time controls of the trained DUET
# bump when what a cell computes changes (2: fine-tuning selected with selection="val_split")
PROTOCOL_VERSION = 2
FINETUNE_MODES = ("head", "all")
PREDICTIONS = "predictions"  # folder: rows.npz (user, label, drift) + <method>__<variant>.npz


@dataclasses.dataclass(frozen=True)
class CellOptions:
    """The grid's protocol choices (each a flag of ``experiments.adapt_grid``)."""

    learning_rates: tuple[float, ...] = (1e-3, 3e-3)
    lags: tuple[int, ...] = (0, 5, 20)
    finetune_learning_rates: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 1e-2)
    finetune_steps: tuple[int, ...] = (0, 1, 5, 20, 50)
    # devices fine-tuning's selection stage samples (FinetuneConfig.selection_devices): all
    # of MovieLens-100K's 943; a sample of Amazon's 17-22k, whose every device at every
    # learning rate would take many CPU hours of all-parameter fine-tuning
    finetune_selection_devices: int = 2048


def _lr_dir(run_dir: str, lr: float) -> str:
    return os.path.join(run_dir, f"lr{lr:g}")


def train_selected(config: ml_collections.ConfigDict, data: Splits, model: DeviceModel,
                   name: str, cell_dir: str, options: CellOptions) -> dict[str, Any]:
    """Train ``name`` at every learning rate; keep the one best on validation.

    -> ``{"params", "learning_rate", "best_epoch", "val", "epochs", "grid"}``.
    """
    select = config.train.select_metric
    best, grid = None, []
    for lr in options.learning_rates:
        run = config.copy_and_resolve_references()
        run.train.learning_rate = float(lr)
        result = experiment.train_method(run, data, model, name,
                                         _lr_dir(os.path.join(cell_dir, name), lr))
        grid.append({"learning_rate": lr, "best_epoch": result.best_epoch,
                     "epochs": len(result.history), "val": result.val})
        score = metrics.selection_score(select, result.val[select])
        if best is None or score > best[0]:
            best = (score, lr, result)
    _, lr, result = best
    return {"params": result.params, "learning_rate": lr, "best_epoch": result.best_epoch,
            "epochs": len(result.history), "val": result.val, "grid": grid}


def _logits_fn(name: str, model: DeviceModel, config: ml_collections.ConfigDict):
    """The jitted ``logits(params, batch)`` of trained method ``name``."""
    return jax.jit(experiment.build_method(config, model, name).logits)


def test_variants(data: Splits, lags: tuple[int, ...]) -> dict[str, SampleSet]:
    """The device-test set under each deployment variant (same rows, other triggers)."""
    out = {f"lag{k}": samples_lib.with_trigger(data, "test", mode="lag", lag=k) for k in lags}
    out["once"] = samples_lib.with_trigger(data, "test", mode="once")
    return out


def run_cell(config: ml_collections.ConfigDict, cell_dir: str, data: Splits,
             options: CellOptions) -> dict[str, Any]:
    """Everything one cell reports; per-row logits go to ``cell_dir/predictions/``."""
    model = get_model(config_lib.model_name(config),
                      config_lib.model_config(config, data.num_items))
    bs = config.train.eval_batch_size
    # wall seconds of each stage in this process (a resumed stage counts only what it redid)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now

    trained = {}
    for name in TRAINED:
        trained[name] = train_selected(config, data, model, name, cell_dir, options)
        lap(f"train_{name}")
    variants = test_variants(data, options.lags)
    test = variants["lag0"]
    logits: dict[str, np.ndarray] = {}
    for name, result in trained.items():
        fn = _logits_fn(name, model, config)
        for variant, samples in variants.items():
            if name == "base" and variant != "lag0":
                continue  # Base reads no trigger: every variant scores what lag0 scores
            logits[f"{name}/{variant}"] = predict(fn, result["params"], samples, bs)
    duet = experiment.duet_variant(config, model, "duet")[0]
    duet_params = trained["duet"]["params"]
    for control in CONTROLS:
        logits[f"{control}/lag0"] = score_at_test_time(
            control, duet, duet_params, variants["lag0"], reference=data.train,
            seed=config.seed, batch_size=bs)
    lap("score_trained_and_controls")

    finetuned = {}
    for mode in FINETUNE_MODES:
        ft = config.copy_and_resolve_references()
        ft.finetune.params = mode
        ft.finetune.learning_rates = tuple(options.finetune_learning_rates)
        ft.finetune.steps = tuple(options.finetune_steps)
        # tune on validation events Base never trained on, score later ones (fair protocol)
        ft.finetune.selection = "val_split"
        ft.finetune.selection_devices = options.finetune_selection_devices
        result = experiment.run_finetune(model, trained["base"]["params"], data, ft,
                                         os.path.join(cell_dir, f"finetune_{mode}"))
        logits[f"finetune_{mode}/once"] = np.asarray(result.pop("test_logits"), np.float32)
        finetuned[mode] = result
        lap(f"finetune_{mode}")

    scores = {key: metrics.evaluate(test.user, test.label, value)
              for key, value in logits.items()}
    drift_score = drift.device_drift(model, trained["base"]["params"]["backbone"], data.train,
                                     test, data.num_users, data.num_items)
    save_predictions(cell_dir, {"user": test.user, "label": test.label, "drift": drift_score},
                     logits)
    lap("metrics_drift_and_predictions")
    return {
        "metrics": scores,
        "selection": {name: {k: v for k, v in r.items() if k != "params"}
                      for name, r in trained.items()},
        "finetune": {mode: {k: r[k] for k in ("learning_rate", "steps", "val",
                                              "selection_devices")}
                     for mode, r in finetuned.items()},
        "params": {name: controls.count_params(r["params"]) for name, r in trained.items()},
        "predictions": PREDICTIONS,
        "predictions_sha256": cache.arrays_digest(logits),
        "stage_seconds": seconds,
    }


def save_predictions(cell_dir: str, rows: dict[str, np.ndarray],
                     logits: dict[str, np.ndarray]) -> None:
    """Write ``rows`` (``user``, ``label``, ``drift``) and each ``"<method>/<variant>"``
    logit array ``[N]`` as its own compressed file under ``cell_dir/predictions/``."""
    folder = os.path.join(cell_dir, PREDICTIONS)
    os.makedirs(folder, exist_ok=True)
    named = {"rows": rows, **{k.replace("/", "__"): {"logits": v} for k, v in logits.items()}}
    for name, arrays in named.items():
        with files.atomic_file(os.path.join(folder, f"{name}.npz"), "wb") as f:
            np.savez_compressed(f, **arrays)


def load_predictions(cell_dir: str) -> dict[str, np.ndarray]:
    """A cell's predictions as ``{"user", "label", "drift", "<method>/<variant>": [N]}``."""
    folder = os.path.join(cell_dir, PREDICTIONS)
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npz"):
            continue
        with np.load(os.path.join(folder, name)) as z:
            if name == "rows.npz":
                out.update({k: z[k] for k in z.files})
            else:
                out[name[:-4].replace("__", "/")] = z["logits"]
    return out
