import numpy as np
import pytest

from duet_jax.data.samples import SampleConfig, build_samples
from duet_jax.errors import ConfigError, DataError


def _sequences(rng, users=12, items=60):
    seqs = [
        rng.choice(np.arange(1, items + 1), size=int(rng.integers(6, 20)), replace=False)
        for _ in range(users)
    ]
    lengths = np.array([len(s) for s in seqs])
    test_start = lengths - rng.integers(1, 4, size=users)
    val_start = test_start - rng.integers(1, 3, size=users)
    return seqs, val_start, test_start, items


def _position_of(seq, item):
    return int(np.flatnonzero(seq == item)[0])


def test_samples_follow_the_protocol(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    config = SampleConfig(seq_len=5, num_negatives=2, eval_negatives=3)
    splits = build_samples(seqs, val_start, test_start, items, config, seed=0)
    for name, lo, hi, negs in [
        ("train", None, val_start, 2),
        ("val", val_start, test_start, 3),
        ("test", test_start, None, 3),
    ]:
        s = getattr(splits, name)
        positives = np.flatnonzero(s.label == 1)
        # one positive then its negatives, sharing its sequences
        assert np.all(s.label.reshape(-1, 1 + negs)[:, 1:] == 0)
        for p in positives:
            seq = seqs[s.user[p]]
            t = _position_of(seq, s.target[p])
            low = config.min_history if lo is None else lo[s.user[p]]
            high = len(seq) if hi is None else hi[s.user[p]]
            assert low <= t < high, (name, t)
            # click_seq = latest items before t, oldest first, right-padded
            k = min(config.seq_len, t)
            np.testing.assert_array_equal(s.click_seq[p, :k], seq[t - k : t])
            assert np.all(s.click_seq[p, k:] == 0)
            # no leakage: the history never holds the target or anything after it
            assert not np.isin(seq[t:], s.click_seq[p]).any()
            np.testing.assert_array_equal(s.trigger_seq[p], s.click_seq[p])  # sync_every = 1
            for j in range(1, 1 + negs):
                assert s.user[p + j] == s.user[p]
                np.testing.assert_array_equal(s.click_seq[p + j], s.click_seq[p])
                assert s.target[p + j] not in seq  # never touched by this user
        assert len(positives) == sum(
            (len(q) if hi is None else hi[u])
            - max(config.min_history if lo is None else lo[u], config.min_history)
            for u, q in enumerate(seqs)
        )


def test_trigger_is_the_sequence_at_the_last_sync(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    config = SampleConfig(seq_len=4, sync_every=3)
    test = build_samples(seqs, val_start, test_start, items, config, seed=0).test
    for p in np.flatnonzero(test.label == 1):
        u = test.user[p]
        seq = seqs[u]
        t = _position_of(seq, test.target[p])
        sync = test_start[u] + (t - test_start[u]) // 3 * 3
        k = min(4, sync)
        np.testing.assert_array_equal(test.trigger_seq[p, :k], seq[sync - k : sync])
        assert np.all(test.trigger_seq[p, k:] == 0)


def test_same_seed_same_bytes_other_seed_other_negatives(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    a = build_samples(seqs, val_start, test_start, items, SampleConfig(), seed=3)
    b = build_samples(seqs, val_start, test_start, items, SampleConfig(), seed=3)
    c = build_samples(seqs, val_start, test_start, items, SampleConfig(), seed=4)
    for name in ("train", "val", "test"):
        for field, arr in getattr(a, name).arrays().items():
            assert arr.tobytes() == getattr(b, name).arrays()[field].tobytes()
    assert not np.array_equal(a.train.target, c.train.target)


def test_stats_count_samples_and_positives(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    splits = build_samples(seqs, val_start, test_start, items, SampleConfig(num_negatives=1), 0)
    stats = splits.stats()
    assert stats["train_samples"] == 2 * stats["train_positives"] == len(splits.train)


def test_bad_boundaries_and_ids_are_reported(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    bad = test_start.copy()
    bad[2] = len(seqs[2]) + 1
    with pytest.raises(DataError, match="user 2"):
        build_samples(seqs, val_start, bad, items, SampleConfig(), 0)
    with pytest.raises(DataError, match=r"item id \d+ is outside 1\.\.5"):
        build_samples(seqs, val_start, test_start, 5, SampleConfig(), 0)


def test_user_without_enough_untouched_items_is_named():
    seqs = [np.array([1, 2]), np.array([1, 2, 3, 4])]
    with pytest.raises(DataError, match="user 1 touched 4 of 5 items"):
        build_samples(seqs, [1, 2], [1, 3], 5, SampleConfig(eval_negatives=2), 0)


def test_negatives_of_one_positive_are_distinct(rng):
    seqs = [rng.choice(np.arange(1, 13), size=6, replace=False) for _ in range(30)]
    splits = build_samples(seqs, [3] * 30, [4] * 30, 12, SampleConfig(eval_negatives=5), 0)
    negatives = splits.test.target.reshape(-1, 6)[:, 1:]  # 5 of the 6 untouched items each
    assert all(len(set(row)) == 5 for row in negatives.tolist())


def test_train_syncs_count_from_min_history(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    config = SampleConfig(seq_len=4, sync_every=3, min_history=2)
    train = build_samples(seqs, val_start, test_start, items, config, seed=0).train
    for p in np.flatnonzero(train.label == 1):
        seq = seqs[train.user[p]]
        t = _position_of(seq, train.target[p])
        sync = 2 + (t - 2) // 3 * 3
        k = min(4, sync)
        np.testing.assert_array_equal(train.trigger_seq[p, :k], seq[sync - k : sync])
        assert np.all(train.trigger_seq[p, k:] == 0)


@pytest.mark.parametrize("value", [0, True, 1.5])
def test_bad_sample_config_names_field(value):
    with pytest.raises(ConfigError, match="sync_every"):
        SampleConfig(sync_every=value)
