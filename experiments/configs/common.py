"""Fields every main-job config shares: the device model, the generator, training.

Dataset configs start from :func:`base_config` and add ``config.data``.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "sasrec"  # sasrec | gru4rec | din
    # comma-separated: base, finetune, duet, and the ablations duet_frozen, duet_stabiliser,
    # duet_stabiliser_rows, duet_two_stage, duet_low_rank
    config.methods = "base,duet"
    config.seed = 0  # parameter init and batch order
    config.seq_len = 30  # items per click/trigger sequence (authors: 30)
    config.embed_dim = 32  # D (authors: 32)

    config.sasrec = ml_collections.ConfigDict()
    config.sasrec.num_heads = 4
    config.sasrec.ffn_mult = 4
    config.sasrec.mask_padding = False  # authors' encoder attends to padding

    config.din = ml_collections.ConfigDict()
    config.din.hidden = (128, 64)  # head 2D -> 128 -> 64 -> 1

    config.generator = ml_collections.ConfigDict()
    config.generator.decoders = "trained"  # trained (paper) | frozen (authors' code)
    # auto = glorot for trained decoders, fmod_normal (authors' code) for frozen ones
    config.generator.decoder_init = "auto"
    config.generator.hidden_dim = 32  # encoder GRU state (authors: D)
    config.generator.z_dim = 32  # z, the decoders' input (authors: D)
    # stabiliser (SWA): M candidate decoders mixed by self-similarity; 0 = off (see the
    # ablation in results/); softmax over "candidates" (paper) or "rows" (authors' code)
    config.generator.stabiliser = 0
    config.generator.stabiliser_softmax = "candidates"
    config.generator.low_rank = 0  # k: generate a k x k core per matrix leaf; 0 = full rank
    # joint (authors' code) | two_stage (paper's figure: Base first, then the generator alone)
    config.generator.training = "joint"

    # what the duet_* ablation methods switch to (methods: duet_stabiliser, duet_low_rank, ...)
    config.ablation = ml_collections.ConfigDict()
    config.ablation.stabiliser = 5  # M (authors: 5 or 10)
    config.ablation.low_rank = 8  # k

    # on-device fine-tuning baseline (method "finetune"): each device starts from Base and
    # takes Adam steps on its own most recent labelled rows; (rate, steps) picked on validation
    config.finetune = ml_collections.ConfigDict()
    config.finetune.steps = (1, 5, 20, 50)
    config.finetune.learning_rates = (1e-3, 1e-2)
    config.finetune.params = "head"  # head | all
    config.finetune.num_samples = 64  # most recent labelled rows per device
    config.finetune.group_size = 64  # devices per vmapped group

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0  # negatives (and, for synthetic data, the fleet)
    # samples (DESIGN.md §2)
    config.data.num_negatives = 1  # per positive, cloud-train
    config.data.eval_negatives = 4  # per positive, validation and device-test
    config.data.sync_every = 1  # trigger_seq = sequence at the last sync; 1 = every request
    config.data.min_history = 1  # earlier items a position needs to become a sample

    config.train = ml_collections.ConfigDict()
    config.train.learning_rate = 1e-3  # authors: Adam 1e-3
    config.train.batch_size = 1024  # authors: 1024
    config.train.eval_batch_size = 4096
    config.train.num_epochs = 10
    config.train.patience = 0  # epochs without validation gain before stopping; 0 = never
    config.train.select_metric = "auc"
    config.train.checkpoint_every_steps = 200
    config.train.progress = True
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
    # DESIGN.md §2 protocol (duet_jax/data/protocol.py)
    config.data.min_rating = 0  # keep interactions rated >= this; 0 keeps all (implicit)
    config.data.dedupe = True  # keep a user's first interaction with each item only
    config.data.user_core = 5  # k-core: users with >= 5 interactions ...
    config.data.item_core = 5  # ... and items with >= 5, applied until both hold
    config.data.val_frac = 0.1  # per user: cloud-validation, before device-test
    config.data.test_frac = 0.2  # per user: the newest items are device-test
    if variant == "quick":
        config.train.num_epochs = 4
    return config
