"""Main job on Douban Book (DTCDR ratings; no timestamps, row order is the only order).

    python -m experiments.main --config=experiments/configs/douban_book.py
    python -m experiments.main --config=experiments/configs/douban_book.py:quick  # fewer epochs

Raw files from $DUET_DATA_DIR or `--config.data.data_dir`; see docs/datasets.md.
"""

import ml_collections

from experiments.configs.common import real_dataset_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return real_dataset_config("douban_book", variant)
