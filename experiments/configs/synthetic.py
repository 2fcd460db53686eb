"""Main job on the built-in synthetic fleet (offline, no files needed).

Any field can be overridden on the command line, e.g.
``--config.model=din --config.train.num_epochs=3 --config.data.num_users=500``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "sasrec"  # sasrec | gru4rec | din
    config.methods = "base,duet"  # comma-separated: base, duet
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

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"
    config.data.seed = 0  # the fleet and its negatives
    # samples (DESIGN.md §2)
    config.data.num_negatives = 1  # per positive, cloud-train
    config.data.eval_negatives = 4  # per positive, validation and device-test
    config.data.sync_every = 1  # trigger_seq = sequence at the last sync; 1 = every request
    config.data.min_history = 1
    # the synthetic world (duet_jax/data/synthetic.py)
    config.data.num_users = 3000
    config.data.num_items = 2000
    config.data.num_categories = 20
    config.data.item_noise = 0.3
    config.data.num_styles = 8
    config.data.drift_rate = 0.03  # per interaction, all periods
    config.data.drift = 1.0  # extra style switch when the device period starts
    config.data.preference_drift = 0.5
    config.data.cloud_len = (30, 50)
    config.data.device_len = (10, 20)
    config.data.val_frac = 0.15
    config.data.transition_strength = 6.0
    config.data.preference_strength = 3.0
    config.data.popularity_strength = 1.0
    config.data.popularity_exponent = 1.0

    config.train = ml_collections.ConfigDict()
    # 3e-3 rather than the authors' 1e-3: this fleet is small (~200k train samples), and the
    # larger step learns it within the 10-minute CPU budget (1e-3 stops near popularity).
    config.train.learning_rate = 3e-3
    config.train.batch_size = 1024
    config.train.eval_batch_size = 4096
    config.train.num_epochs = 10
    config.train.patience = 0
    config.train.select_metric = "auc"
    config.train.checkpoint_every_steps = 200
    config.train.progress = True
    return config
