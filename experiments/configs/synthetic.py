"""Main job on the built-in synthetic fleet (offline, no files needed).

Any field can be overridden on the command line, e.g.
``--config.model=din --config.train.num_epochs=3 --config.data.num_users=500``.
"""

import dataclasses

import ml_collections

from duet_jax.data.synthetic import SyntheticConfig
from experiments.configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "synthetic"
    # the synthetic world (duet_jax.data.synthetic.SyntheticConfig documents each field)
    config.data.update(dataclasses.asdict(SyntheticConfig()))

    # 3e-3 rather than the authors' 1e-3: this fleet is small (~200k train samples), and the
    # larger step learns it within the 10-minute CPU budget (1e-3 stops near popularity).
    config.train.learning_rate = 3e-3
    return config
