"""The vision task on sklearn's handwritten digits: a fleet of writers whose style and label
prior drift after deployment (``duet_jax.vision.data``); Base, base_wide, fine-tuning (head
and all parameters) and DUET with a set encoder (``duet_jax.vision.methods``).

    python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits

Variant ``tiny`` (``digits.py:tiny``): a few devices and steps, for tests. The TFDS path:
``--config.data.source=tfds --config.data.tfds_name=mnist --config.data.tfds_dir=DIR
--config.data.image_size=28`` (the dataset prepared in DIR beforehand; nothing is
downloaded).
"""

import dataclasses

import ml_collections

from duet_jax.vision.data import FleetConfig
from duet_jax.vision.methods import VisionTrainConfig
from duet_jax.vision.model import VisionConfig


def _section(cls, **changes) -> ml_collections.ConfigDict:
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "seed"}
    return ml_collections.ConfigDict({**fields, **changes})


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "vision"  # experiments.main hands the config to experiments.vision
    config.model = "mobilenet"
    config.seed = 0  # the fleet's draws, the batches and every init
    config.methods = "base,base_wide,duet,finetune_head,finetune_all"
    config.bootstrap_resamples = 1000
    config.data = _section(FleetConfig)
    # backbone and head sizes (image size, channels, classes come from the data)
    vision = VisionConfig()
    config.vision = ml_collections.ConfigDict({
        "stem_channels": vision.stem_channels, "blocks": vision.blocks,
        "head_hidden": vision.head_hidden})
    config.train = _section(VisionTrainConfig)
    if variant == "tiny":
        config.data.num_devices = 6
        config.data.train_per_device = 12
        # val and test of one size, set_size = recent: evaluation compiles once per method
        config.data.val_per_device = 6
        config.data.recent_per_device = 4
        config.data.test_per_device = 6
        config.vision.stem_channels = 4
        config.vision.blocks = ((8, 2),)
        config.vision.head_hidden = 8
        config.train.steps = 6
        config.train.devices_per_step = 3
        config.train.rows_per_device = 6
        config.train.set_size = 4
        config.train.eval_every = 3
        config.train.hidden_dim = 8
        config.train.z_dim = 4
        config.train.finetune_lrs = (1e-2,)
        config.train.finetune_steps = (1, 2)
        config.bootstrap_resamples = 50
    elif variant is not None:
        raise ValueError(f"digits.py: unknown variant {variant!r} (known: tiny)")
    return config
