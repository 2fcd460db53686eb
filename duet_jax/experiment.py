"""One experiment: prepare data, train and evaluate each method, return one row per method."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from duet_jax import config as config_lib
from duet_jax.data import authors_format, datasets
from duet_jax.data.cache import cached_splits
from duet_jax.data.samples import Splits
from duet_jax.data.synthetic import build_synthetic
from duet_jax.methods import get_method
from duet_jax.metrics import METRIC_NAMES
from duet_jax.models import get_model
from duet_jax.training import train_and_evaluate

ROW_KEYS = ("model", "method", *METRIC_NAMES, "seed")


def load_data(config: ml_collections.ConfigDict, workdir: str | None = None) -> Splits:
    """The train/val/test samples the config names (deterministic in ``config.data.seed``).

    Real datasets and the authors' text files are cached under ``workdir/data`` (when a
    workdir is given), so a second run does not rebuild them.
    """
    name = config_lib.dataset_name(config)
    samples = config_lib.sample_config(config)
    seed = config.data.seed
    if name == "synthetic":
        return build_synthetic(config_lib.synthetic_config(config), samples, seed)
    cache_dir = os.path.join(workdir, "data") if workdir else None
    key = {"dataset": name, "seed": seed, "samples": dataclasses.asdict(samples)}
    if name == "authors_text":
        files = config_lib.text_files(config)
        key["files"] = {k: _file_identity(v) for k, v in files.items()}
        key["val_frac"] = config.data.val_frac

        def build() -> Splits:
            return authors_format.load_splits(**files, seq_len=samples.seq_len,
                                              val_frac=config.data.val_frac)
    else:
        protocol = config_lib.protocol_config(config)
        key["protocol"] = dataclasses.asdict(protocol)
        key["version"] = str(datasets.builder_class(name).VERSION)

        def build() -> Splits:
            return datasets.build_splits(
                name, protocol, samples, seed,
                data_dir=config.data.data_dir or None, tfds_dir=config.data.tfds_dir or None,
            )
    return cached_splits(cache_dir, key, build)


def _file_identity(path: str) -> list | None:
    """What identifies a file's content cheaply: absolute path, size and mtime."""
    if not path:
        return None
    stat = os.stat(path) if os.path.isfile(path) else None
    return [os.path.abspath(path), stat.st_size if stat else None,
            stat.st_mtime_ns if stat else None]


def run(config: ml_collections.ConfigDict, workdir: str, data: Splits | None = None) -> list[dict]:
    """Train every method in ``config.methods`` for ``config.model``; rows for results.json.

    Each method's run checkpoints under ``workdir/<method>`` and resumes from there when the
    same command runs again (a workdir holds one model's experiment).
    """
    config_lib.validate(config)
    data = load_data(config, workdir) if data is None else data
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
