"""Build one real dataset and report its statistics.

    python -m experiments.prepare_data --dataset=movielens_100k --out=runs/data/ml100k
    python -m experiments.prepare_data --dataset=amazon_cds --data_dir=/data --out=DIR

Builds the TFDS dataset (array_record) once, where every entry point looks for it:
``--tfds_dir``, else the config's ``config.data.tfds_dir``, else ``$TFDS_DATA_DIR``, else
TFDS's default ``~/tensorflow_datasets``; a main job with the same setting reuses it. Applies
the sample protocol every dataset config shares (override fields with
``--config.data.user_core=10`` etc., or pass another ``--config``), caches the
samples under ``DIR/data`` and writes ``DIR/stats.json``: users, items and interactions
before and after filtering, samples, positives and negatives per split, mean lengths.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from duet_jax.data import datasets
from duet_jax.files import dumps, write_text_atomic
from experiments import cli, experiment
from experiments import config as config_lib

_DATASET = flags.DEFINE_enum("dataset", None, list(config_lib.REAL_DATASETS), "Dataset to build.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Raw files: DUET_DATA_DIR-style root or the dataset's own directory "
    "(default: $DUET_DATA_DIR; MovieLens-100K downloads when neither is set).",
)
_OUT = flags.DEFINE_string("out", None, "Output directory for stats.json and the samples.")
_TFDS_DIR = flags.DEFINE_string(
    "tfds_dir",
    None,
    "TFDS data directory (default: config.data.tfds_dir, else $TFDS_DATA_DIR, else "
    "~/tensorflow_datasets).",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "movielens_100k.py"),
    "Config file whose config.data protocol to apply. Every dataset config shares the same "
    "protocol defaults; --dataset sets config.data.name.",
    lock_config=True,
)
flags.mark_flags_as_required(["dataset", "out"])


def main(argv):
    cli.start(argv)
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
        config.data.name = _DATASET.value
        if _DATA_DIR.value is not None:
            config.data.data_dir = _DATA_DIR.value
        if _TFDS_DIR.value is not None:
            config.data.tfds_dir = _TFDS_DIR.value
    config_lib.validate(config)
    data = experiment.load_data(config, workdir=_OUT.value)
    tfds_dir = datasets.tfds_data_dir(config.data.get("tfds_dir") or None)
    print(f"TFDS data directory: {tfds_dir}")
    stats = data.stats()
    path = os.path.join(_OUT.value, "stats.json")
    write_text_atomic(path, dumps(stats))
    for key, value in stats.items():
        print(f"{key:>28}: {value}")
    print(f"statistics written to {os.path.abspath(path)}")


run = cli.entry_point(main)  # the console script

if __name__ == "__main__":
    run()
