"""Main job on files in the DUET authors' released text format.

    python -m experiments.main --config=experiments/configs/authors_text.py \
        --config.data.train_file=PATH/train.txt --config.data.test_file=PATH/test.txt

One sample per line, ``user;target;trigger_seq;click_seq;label`` (duet_jax/data/
authors_format.py). Their release has train and test only: with ``val_file=''`` each user's
last ``val_frac`` of train samples is held out for model selection.
"""

import ml_collections

from experiments.configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "authors_text"
    config.data.train_file = ""
    config.data.val_file = ""  # '' = hold out the last val_frac of each user's train samples
    config.data.test_file = ""
    config.data.val_frac = 0.1
    return config
