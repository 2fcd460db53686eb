"""Main job on MovieLens-100K (GroupLens `u.data`, ordered by timestamp).

    python -m experiments.main --config=experiments/configs/movielens_100k.py
    python -m experiments.main --config=experiments/configs/movielens_100k.py:quick  # fewer epochs

Raw files from $DUET_DATA_DIR or `--config.data.data_dir`; see docs/datasets.md.
"""

import ml_collections

from experiments.configs.common import real_dataset_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return real_dataset_config("movielens_100k", variant)
