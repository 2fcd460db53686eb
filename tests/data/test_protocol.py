"""The real-data protocol (docs/datasets.md) on crafted records: filters, k-core, remapping,
splits."""

import numpy as np
import pytest

from duet_jax.data.protocol import ProtocolConfig, prepare_sequences
from duet_jax.data.raw import NO_RATING, NO_TIMESTAMP, UserRecord
from duet_jax.errors import ConfigError, DataError


def record(user, items, ratings=None):
    items = np.asarray(items, np.int64)
    ratings = np.full(len(items), NO_RATING) if ratings is None else np.asarray(ratings)
    return UserRecord(str(user), items, np.full(len(items), NO_TIMESTAMP), ratings.astype(np.int8))


def test_k_core_iterates_until_users_and_items_both_hold():
    # item 99 is seen twice; dropping it leaves user 3 with one item, which drops user 3,
    # which leaves item 50 with one interaction, which is dropped too.
    records = [
        record(1, [10, 20, 30, 99]),
        record(2, [10, 20, 30, 50]),
        record(3, [50, 99]),
        record(4, [30, 20, 10]),
    ]
    seqs = prepare_sequences(records, ProtocolConfig(user_core=3, item_core=2))
    assert seqs.user_ids == ["1", "2", "4"]
    assert seqs.item_ids.tolist() == [0, 10, 20, 30]  # 1..3 in ascending dataset id
    assert [s.tolist() for s in seqs.sequences] == [[1, 2, 3], [1, 2, 3], [3, 2, 1]]
    assert seqs.stats["raw_interactions"] == 13 and seqs.stats["interactions"] == 9


def test_min_rating_and_dedupe_are_counted_not_silent():
    records = [record(1, [5, 6, 5, 7, 8], ratings=[5, 2, 4, 4, 3])]
    seqs = prepare_sequences(records, ProtocolConfig(min_rating=3, user_core=1, item_core=1))
    assert seqs.stats["dropped_by_min_rating"] == 1
    assert seqs.stats["dropped_repeats"] == 1  # the second 5, kept first occurrence only
    assert seqs.item_ids[seqs.sequences[0]].tolist() == [5, 7, 8]
    keep_all = prepare_sequences(records, ProtocolConfig(dedupe=False, user_core=1, item_core=1))
    assert keep_all.item_ids[keep_all.sequences[0]].tolist() == [5, 6, 5, 7, 8]


@pytest.mark.parametrize("n, test, val", [(5, 1, 1), (10, 2, 1), (20, 4, 2), (101, 20, 10)])
def test_split_sizes_are_floor_fractions_with_at_least_one(n, test, val):
    seqs = prepare_sequences(
        [record(1, np.arange(1, n + 1))], ProtocolConfig(user_core=1, item_core=1)
    )
    assert seqs.test_start[0] == n - test
    assert seqs.val_start[0] == n - test - val


def test_empty_after_filtering_names_the_dataset_and_filters():
    with pytest.raises(
        DataError,
        match=r"toy: no interactions left after filtering "
        r"\(min_rating=0, user_core=50, item_core=5\)",
    ):
        prepare_sequences([record(1, [1, 2, 3])], ProtocolConfig(user_core=50), dataset="toy")


@pytest.mark.parametrize(
    "field, value", [("user_core", -1), ("val_frac", 1.5), ("test_frac", 0.0), ("dedupe", 1)]
)
def test_bad_protocol_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ProtocolConfig(**{field: value})
