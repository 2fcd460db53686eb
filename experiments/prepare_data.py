"""Build one real dataset and report its statistics.

    python -m experiments.prepare_data --dataset=movielens_100k --out=runs/data/ml100k
    python -m experiments.prepare_data --dataset=amazon_cds --data_dir=/data --out=DIR

Builds the TFDS dataset (array_record, under ``DIR/tfds`` unless ``--tfds_dir``), applies
the sample protocol every dataset config shares (override fields with
``--config.data.user_core=10`` etc., or pass another ``--config``), caches the
samples under ``DIR/data`` and writes ``DIR/stats.json``: users, items and interactions
before and after filtering, samples, positives and negatives per split, mean lengths.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from duet_jax import config as config_lib
from duet_jax import experiment
from duet_jax.files import dumps, write_text_atomic
from experiments import cli

_DATASET = flags.DEFINE_enum("dataset", None, list(config_lib.REAL_DATASETS), "Dataset to build.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Raw files: DUET_DATA_DIR-style root or the dataset's own directory "
    "(default: $DUET_DATA_DIR; MovieLens-100K downloads when neither is set).",
)
_OUT = flags.DEFINE_string("out", None, "Output directory for stats.json and the samples.")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "TFDS data directory (default: OUT/tfds).")
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
        config.data.tfds_dir = _TFDS_DIR.value or os.path.join(_OUT.value, "tfds")
    config_lib.validate(config)
    data = experiment.load_data(config, workdir=_OUT.value)
    stats = data.stats()
    path = os.path.join(_OUT.value, "stats.json")
    write_text_atomic(path, dumps(stats))
    for key, value in stats.items():
        print(f"{key:>28}: {value}")
    print(f"statistics written to {os.path.abspath(path)}")


if __name__ == "__main__":
    app.run(main)
