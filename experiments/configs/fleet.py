"""Fleet simulation (``python -m experiments.fleet``): the main-job config plus ``config.fleet``.

    --config=experiments/configs/fleet.py                  # synthetic fleet, offline
    --config=experiments/configs/fleet.py:movielens_100k   # MovieLens-100K ($DUET_DATA_DIR)

Training (Base and DUET, in ``WORKDIR/train``) uses the main job's fields with a smaller
budget, so the whole job fits in a few minutes on 2 CPU cores; a rerun resumes from the
checkpoints and changing only ``config.fleet`` never retrains. Override any field, e.g.
``--config.fleet.num_devices=500 --config.fleet.policies=every_round,never``.
"""

import ml_collections

from experiments.configs import movielens_100k, synthetic

VARIANTS = ("", "movielens_100k")


def fleet_fields() -> ml_collections.ConfigDict:
    """``config.fleet`` (duet_jax/fleet.py, FleetConfig)."""
    fleet = ml_collections.ConfigDict()
    fleet.num_devices = 0  # N: 0 = every user with a device-test period
    fleet.num_rounds = 10  # T: each device's device-test stream is cut into T chunks
    # request policies to compare (comma-separated): every_round, every_k_items,
    # drift_threshold, never (the head of the first sync, never refreshed)
    fleet.policies = "every_round,every_k_items,drift_threshold,never"
    fleet.every_k = 3  # every_k_items: request after this many new interactions
    fleet.threshold = 0.1  # drift_threshold: distance of the recent-items mean embedding
    fleet.drift_window = 5  # drift_threshold: the most recent items averaged
    fleet.distance = "cosine"  # drift_threshold: cosine (1 - cos) or l2
    fleet.formats = "float32,bfloat16,int8"  # delivery formats (comma-separated)
    fleet.upload = "ids"  # ids (raw item ids) | z (embedding only: privacy-preserving)
    fleet.base = True  # score Base (the static cloud head) alongside
    fleet.min_bucket = 64  # cloud batches are powers of two in [min_bucket, max_bucket]
    fleet.max_bucket = 4096
    fleet.score_batch_size = 2048
    fleet.seed = 0  # which devices take part when num_devices < all
    fleet.progress = True
    return fleet


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown fleet config variant {variant!r}: expected one of {VARIANTS}")
    if variant == "movielens_100k":
        config = movielens_100k.get_config()
    else:
        config = synthetic.get_config()
    # A small training budget: the fleet compares policies and formats of one trained
    # DUET, so budget-bound parameters are fine (the main job reports converged-ish ones).
    config.train.num_epochs = 3
    config.fleet = fleet_fields()
    return config
