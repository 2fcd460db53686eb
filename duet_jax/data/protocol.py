"""Real data: user records -> filtered, remapped, split sequences -> samples
(docs/datasets.md, "Protocol").

Every choice is a :class:`ProtocolConfig` field, applied in this order:

1. ``min_rating``: keep interactions rated at least this (0 keeps all; datasets without
   ratings keep all).
2. ``dedupe``: keep only a user's first interaction with an item (repeat consumption is a
   different task, and it would put a sample's own target in its history).
3. k-core: repeatedly drop users with fewer than ``user_core`` and items with fewer than
   ``item_core`` interactions, until both hold.
4. Remap ids: items ``1..num_items`` in ascending order of their dataset id (0 = padding);
   users ``0..num_users-1`` in ascending order of their dataset id.
5. Split each user's chronological sequence of ``n`` items: the last
   ``max(1, floor(test_frac * n))`` are device-test, the ``max(1, floor(val_frac * n))``
   before them cloud-validation, the rest cloud-train.
6. :func:`duet_jax.data.samples.build_samples` turns positions into labelled samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from duet_jax.data.raw import NO_RATING, UserRecord
from duet_jax.data.samples import SampleConfig, Splits, build_samples
from duet_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    min_rating: int = 0
    dedupe: bool = True
    user_core: int = 5
    item_core: int = 5
    val_frac: float = 0.1
    test_frac: float = 0.2

    def __post_init__(self):
        if not isinstance(self.dedupe, bool):
            raise ConfigError("ProtocolConfig.dedupe", self.dedupe, "True or False")
        for name in ("min_rating", "user_core", "item_core"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"ProtocolConfig.{name}", value, "an integer >= 0")
        for name in ("val_frac", "test_frac"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (0.0 < value < 1.0)
            ):
                raise ConfigError(f"ProtocolConfig.{name}", value, "a number in (0, 1)")
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError(
                "ProtocolConfig.test_frac",
                self.test_frac,
                f"val_frac + test_frac < 1 (val_frac={self.val_frac})",
            )


@dataclasses.dataclass
class Sequences:
    """Filtered, remapped sequences ready for :func:`build_samples`."""

    sequences: list[np.ndarray]  # per user, int64 item ids in 1..num_items, oldest first
    val_start: np.ndarray  # [U] first validation position
    test_start: np.ndarray  # [U] first device-test position
    num_items: int
    user_ids: list[str]  # dataset user id of each user index
    item_ids: np.ndarray  # [num_items + 1] dataset item id of each item index (0: padding)
    stats: dict


def _k_core(user: np.ndarray, item: np.ndarray, user_core: int, item_core: int) -> np.ndarray:
    """Boolean mask of the interactions that survive iterative k-core filtering."""
    keep = np.ones(len(user), bool)
    while True:
        u_count = np.bincount(user[keep], minlength=user.max() + 1)
        i_count = np.bincount(item[keep], minlength=item.max() + 1)
        ok = keep & (u_count[user] >= user_core) & (i_count[item] >= item_core)
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def prepare_sequences(
    records: list[UserRecord], config: ProtocolConfig, dataset: str = "dataset"
) -> Sequences:
    """Steps 1-5 of the module docstring. ``records`` keep each user's items oldest first."""
    if not records:
        raise DataError(f"{dataset}: no users to prepare")
    lengths = np.array([len(r.items) for r in records])
    user = np.repeat(np.arange(len(records)), lengths)
    raw_item = np.concatenate([r.items for r in records]).astype(np.int64)
    rating = np.concatenate([r.ratings for r in records]).astype(np.int64)
    stats = {
        "raw_users": len(records),
        "raw_items": len(np.unique(raw_item)),
        "raw_interactions": len(raw_item),
    }
    keep = (rating == NO_RATING) | (rating >= config.min_rating)
    stats["dropped_by_min_rating"] = int((~keep).sum())
    # dense item indices first: every array below is sized by the number of distinct items,
    # never by the largest id (ids may be sparse 64-bit values)
    item_index, dense_item = np.unique(raw_item, return_inverse=True)
    if config.dedupe:
        # first occurrence of each (user, item), in sequence order
        key = user * len(item_index) + dense_item
        first = np.zeros(len(key), bool)
        first[np.unique(np.where(keep, key, -1), return_index=True)[1]] = True
        first &= keep
        stats["dropped_repeats"] = int(keep.sum() - first.sum())
        keep = first
    else:
        stats["dropped_repeats"] = 0
    keep &= _k_core(user, dense_item, config.user_core, config.item_core)
    if not keep.any():
        raise DataError(
            f"{dataset}: no interactions left after filtering (min_rating="
            f"{config.min_rating}, user_core={config.user_core}, item_core={config.item_core}); "
            f"{stats['raw_interactions']} before"
        )
    kept_items = np.unique(dense_item[keep])
    remap = np.zeros(len(item_index), np.int64)
    remap[kept_items] = np.arange(1, len(kept_items) + 1)
    counts = np.bincount(user[keep], minlength=len(records))
    kept_users = np.flatnonzero(counts)
    per_user = np.split(remap[dense_item[keep]], np.cumsum(counts)[:-1])  # user is sorted
    sequences = [per_user[u] for u in kept_users]
    n = np.array([len(s) for s in sequences], np.int64)
    n_test = np.maximum(1, np.floor(config.test_frac * n).astype(np.int64))
    n_val = np.maximum(1, np.floor(config.val_frac * n).astype(np.int64))
    test_start = n - n_test
    val_start = np.maximum(0, test_start - n_val)
    stats.update(
        users=len(sequences),
        items=len(kept_items),
        interactions=int(n.sum()),
        mean_sequence_length=round(float(n.mean()), 3),
        min_sequence_length=int(n.min()),
        max_sequence_length=int(n.max()),
    )
    return Sequences(
        sequences=sequences,
        val_start=val_start,
        test_start=test_start,
        num_items=len(kept_items),
        user_ids=[records[u].user for u in kept_users],
        item_ids=np.r_[0, item_index[kept_items]],
        stats=stats,
    )


def build_dataset_samples(
    records: list[UserRecord],
    protocol: ProtocolConfig,
    samples: SampleConfig,
    seed: int,
    dataset: str = "dataset",
) -> tuple[Splits, dict]:
    """Records -> train/val/test samples and the statistics ``prepare_data`` reports."""
    seqs = prepare_sequences(records, protocol, dataset)
    splits = build_samples(
        seqs.sequences, seqs.val_start, seqs.test_start, seqs.num_items, samples, seed
    )
    stats = dict(seqs.stats)
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        positives = int(split.label.sum())
        stats[f"{name}_samples"] = len(split)
        stats[f"{name}_positives"] = positives
        stats[f"{name}_negatives"] = len(split) - positives
        valid = (split.click_seq > 0).sum(axis=1)
        stats[f"{name}_mean_click_seq_len"] = round(float(valid.mean()), 3) if len(split) else 0.0
    return splits, stats
