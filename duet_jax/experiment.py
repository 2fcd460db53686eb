"""One experiment: prepare data, train and evaluate each method, return one row per method."""

from __future__ import annotations

import logging
import os

import ml_collections

from duet_jax import config as config_lib
from duet_jax.data.samples import Splits
from duet_jax.data.synthetic import build_synthetic
from duet_jax.methods import get_method
from duet_jax.metrics import METRIC_NAMES
from duet_jax.models import get_model
from duet_jax.training import train_and_evaluate

ROW_KEYS = ("model", "method", *METRIC_NAMES, "seed")


def load_data(config: ml_collections.ConfigDict) -> Splits:
    """The train/val/test samples the config names (deterministic in ``config.data.seed``)."""
    name = config_lib.dataset_name(config)
    if name == "synthetic":
        return build_synthetic(
            config_lib.synthetic_config(config), config_lib.sample_config(config), config.data.seed
        )
    raise AssertionError(name)  # dataset_name() already rejected unknown names


def run(config: ml_collections.ConfigDict, workdir: str, data: Splits | None = None) -> list[dict]:
    """Train every method in ``config.methods`` for ``config.model``; rows for results.json.

    Each method's run checkpoints under ``workdir/<method>`` and resumes from there when the
    same command runs again (a workdir holds one model's experiment).
    """
    config_lib.validate(config)
    data = load_data(config) if data is None else data
    model_config = config_lib.model_config(config, data.num_items)
    model = get_model(config_lib.model_name(config), model_config)
    train_config = config_lib.train_config(config)
    identity = config_lib.run_identity(config)
    rows = []
    for name in config_lib.methods(config):
        method = get_method(name, model, **config_lib.generator_options(config))
        run_dir = os.path.join(workdir, name)
        logging.info("training %s/%s in %s", model.name, name, run_dir)
        result = train_and_evaluate(
            method,
            data,
            train_config,
            run_dir,
            seed=config.seed,
            run_config=identity,
            name=f"{model.name}/{name}",
        )
        rows.append(
            {
                "model": model.name,
                "method": name,
                **{k: result.test[k] for k in METRIC_NAMES},
                "seed": config.seed,
                "dataset": config.data.name,
                "best_epoch": result.best_epoch,
                f"val_{train_config.select_metric}": result.val[train_config.select_metric],
                "train_steps": result.steps,
                "train_seconds": round(result.train_seconds, 2),
            }
        )
    return rows
