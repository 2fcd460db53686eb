"""Fleet simulation (``python -m experiments.fleet``): the main-job config plus ``config.fleet``.

    --config=experiments/configs/fleet.py                  # synthetic fleet, offline
    --config=experiments/configs/fleet.py:movielens_100k   # MovieLens-100K ($DUET_DATA_DIR)

Training (Base and DUET, in ``WORKDIR/train``) uses the main job's fields with a smaller
budget, so the whole job fits in a few minutes on 2 CPU cores; a rerun resumes from the
checkpoints and changing only ``config.fleet`` never retrains. Override any field, e.g.
``--config.fleet.num_devices=500 --config.fleet.policies=every_round,never``.

``config.fleet`` holds :class:`duet_jax.fleet.FleetConfig`'s defaults (its fields are
documented there, and it checks them); the lists are comma-separated strings:

- ``num_devices`` (N, 0 = every user with a device-test period), ``num_rounds`` (T: each
  device's device-test stream is cut into T chunks), ``seed`` (which devices take part);
- ``policies``: every_round, every_k_items (``every_k``), drift_threshold (``threshold``,
  ``drift_window``, ``distance``), never (the head of the first sync, never refreshed);
- ``formats`` (delivery: float32, bfloat16, int8), ``upload`` (ids | z);
- ``base`` (score the static cloud head alongside), ``min_bucket`` / ``max_bucket`` (cloud
  batch sizes), ``vector_width`` (the cloud's CPU vector width in bits, 0 = XLA's
  default), ``score_batch_size``, ``progress``.
"""

import ml_collections

from duet_jax.fleet import FleetConfig
from experiments.configs import movielens_100k, synthetic

VARIANTS = ("", "movielens_100k")


def fleet_fields() -> ml_collections.ConfigDict:
    """``config.fleet``: every :class:`FleetConfig` field at its default."""
    return FleetConfig().to_config()


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
