"""Fields every main-job config shares: the device model, the generator, training.

Dataset configs start from :func:`base_config` and add ``config.data``.
"""

import dataclasses

import ml_collections

from duet_jax.data.protocol import ProtocolConfig
from duet_jax.data.samples import SampleConfig
from duet_jax.finetune import FinetuneConfig
from duet_jax.methods import DuetOptions
from duet_jax.models import ModelConfig
from duet_jax.training import TrainConfig


def fields_of(instance, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A config section holding a library dataclass's fields at their defaults: defaults are
    written once, in the library (each dataclass documents its fields)."""
    return ml_collections.ConfigDict(
        {k: v for k, v in dataclasses.asdict(instance).items() if k not in exclude}
    )


def base_config() -> ml_collections.ConfigDict:
    model = ModelConfig(num_items=1)
    config = ml_collections.ConfigDict()
    config.model = "sasrec"  # sasrec | gru4rec | din, or a model added with register_model
    # comma-separated names from the method registry (duet_jax.methods): base, finetune,
    # duet, and the ablations duet_frozen, duet_stabiliser, duet_stabiliser_rows,
    # duet_two_stage, duet_low_rank
    config.methods = "base,duet"
    config.seed = 0  # parameter init and batch order
    config.seq_len = model.seq_len  # items per click/trigger sequence (authors: 30)
    config.embed_dim = model.embed_dim  # D (authors: 32)

    config.sasrec = ml_collections.ConfigDict()
    config.sasrec.num_heads = model.num_heads
    config.sasrec.ffn_mult = model.ffn_mult
    config.sasrec.mask_padding = model.mask_padding  # authors' encoder attends to padding

    config.din = ml_collections.ConfigDict()
    config.din.hidden = model.din_hidden  # head 2D -> 128 -> 64 -> 1

    config.generator = fields_of(DuetOptions())  # duet_jax.methods.DuetOptions

    # what the duet_* ablation methods switch to (methods: duet_stabiliser, duet_low_rank, ...)
    config.ablation = ml_collections.ConfigDict()
    config.ablation.stabiliser = 5  # M (authors: 5 or 10)
    config.ablation.low_rank = 8  # k

    # on-device fine-tuning baseline (method "finetune"): each device starts from Base and
    # takes Adam steps on its own most recent labelled rows; (rate, steps) picked on
    # validation (duet_jax.finetune.FinetuneConfig; select_metric and progress come from
    # config.train, the seed of selection_devices' sample from config.seed)
    config.finetune = fields_of(FinetuneConfig(), exclude=("select_metric", "progress", "seed"))

    # how samples are made from sequences (duet_jax.data.samples.SampleConfig; docs/datasets.md)
    config.data = fields_of(SampleConfig(), exclude=("seq_len",))
    config.data.seed = 0  # negatives (and, for synthetic data, the fleet)

    config.train = fields_of(TrainConfig())  # duet_jax.training.TrainConfig
    return config


def real_dataset_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
    """Main-job config for a dataset built with TFDS from its raw files.

    ``variant="quick"`` (``--config=experiments/configs/<name>.py:quick``) trains fewer
    epochs, for a first look on a laptop.
    """
    if variant not in ("", "quick"):
        raise ValueError(f"unknown config variant {variant!r}: expected '' or 'quick'")
    config = base_config()
    config.data.name = name
    # where the raw files are: '' = $DUET_DATA_DIR (MovieLens-100K downloads if unset)
    config.data.data_dir = ""
    # where TFDS writes the built dataset: '' = TFDS's default ($TFDS_DATA_DIR or
    # ~/tensorflow_datasets)
    config.data.tfds_dir = ""
    # how records become sequences (duet_jax.data.protocol.ProtocolConfig; docs/datasets.md)
    config.data.update(dataclasses.asdict(ProtocolConfig()))
    if variant == "quick":
        config.train.num_epochs = 4
    return config
