"""Main job on Amazon Toys & Games (S3-Rec 5-core, ordered sequences).

    python -m experiments.main --config=experiments/configs/amazon_toys.py
    python -m experiments.main --config=experiments/configs/amazon_toys.py:quick  # fewer epochs

Raw files from $DUET_DATA_DIR or `--config.data.data_dir`; see docs/datasets.md.
"""

import ml_collections

from experiments.configs.common import real_dataset_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return real_dataset_config("amazon_toys", variant)
