import dataclasses

import numpy as np
import pytest

from duet_jax.data import authors_format
from duet_jax.data.samples import SampleConfig, build_samples, with_trigger
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


# ---- deployment protocol: sync lag and once per device ----------------------------------

# One user, items 11..30 (item at position p is 11 + p): validation from 10, test from 14.
HAND = [np.arange(11, 31)]


def _hand(**fields):
    config = SampleConfig(seq_len=4, eval_negatives=2, **fields)
    return build_samples(HAND, [10], [14], 40, config, seed=0)


def _positives(samples):
    return np.flatnonzero(samples.label == 1)


def test_lag_k_trigger_ends_exactly_k_positions_before_the_target():
    splits = _hand()
    for k in (0, 1, 5, 12):
        test = with_trigger(splits, "test", "lag", k)
        for p in _positives(test):
            t = int(test.target[p]) - 11
            assert t == test.position[p]
            end = max(t - k, 1)  # clipped at min_history=1: the user's first item
            expected = list(range(11 + max(0, end - 4), 11 + end))
            assert test.trigger_seq[p].tolist() == expected + [0] * (4 - len(expected))
    # a worked row: position 16 (item 27) at lag 5 sees the 4 items before position 11
    lag5 = with_trigger(splits, "test", "lag", 5)
    row = int(np.flatnonzero((lag5.label == 1) & (lag5.target == 27))[0])
    assert lag5.trigger_seq[row].tolist() == [18, 19, 20, 21]
    # lag 20 reaches before the first item: clipped to the first min_history items
    assert with_trigger(splits, "test", "lag", 20).trigger_seq[row].tolist() == [11, 0, 0, 0]


def test_min_history_clips_the_lag():
    splits = _hand(min_history=3)
    test = with_trigger(splits, "test", "lag", 19)
    assert np.all(test.trigger_seq == [11, 12, 13, 0])  # the first sync, at position 3


def _last_sync(t, val_start, test_start, min_history, every):
    """Brute force: the latest scheduled sync at or before t (syncs at each period's start,
    train's at min_history, then every `every` positions within the period)."""
    periods = [(min_history, val_start), (val_start, test_start), (test_start, t + 1)]
    return max(s for lo, hi in periods for s in range(lo, hi, every) if s <= t)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_lag_applies_on_top_of_the_sync_schedule(rng, every):
    seqs, val_start, test_start, items = _sequences(rng)
    config = SampleConfig(seq_len=4, sync_every=every, min_history=2)
    splits = build_samples(seqs, val_start, test_start, items, config, seed=0)
    for name in ("train", "val", "test"):
        for k in (0, 1, 4):
            s = with_trigger(splits, name, "lag", k)
            for p in _positives(s):
                u, t = s.user[p], int(s.position[p])
                assert seqs[u][t] == s.target[p]
                sync = _last_sync(max(t - k, 2), val_start[u], test_start[u], 2, every)
                n = min(4, sync)
                np.testing.assert_array_equal(s.trigger_seq[p, :n], seqs[u][sync - n : sync])
                assert np.all(s.trigger_seq[p, n:] == 0)


def test_once_trigger_is_the_sequence_before_the_device_period(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    splits = build_samples(seqs, val_start, test_start, items, SampleConfig(seq_len=4), 0)
    test = with_trigger(splits, "test", "once")
    for u in np.unique(test.user):
        rows = test.trigger_seq[test.user == u]
        assert np.all(rows == rows[0])  # one trigger for every test row of the device
        start = test_start[u]
        n = min(4, start)
        np.testing.assert_array_equal(rows[0, :n], seqs[u][start - n : start])
        assert np.all(rows[0, n:] == 0)
        assert start == test.position[test.user == u].min()  # its first device-test position
    val = with_trigger(splits, "val", "once")  # validation: frozen at its own start
    for p in _positives(val):
        start = val_start[val.user[p]]
        n = min(4, start)
        np.testing.assert_array_equal(val.trigger_seq[p, :n], seqs[val.user[p]][start - n : start])


def test_once_ignores_the_sync_schedule():
    assert np.array_equal(
        with_trigger(_hand(sync_every=3), "test", "once").trigger_seq,
        with_trigger(_hand(), "test", "once").trigger_seq,
    )
    assert np.all(with_trigger(_hand(), "test", "once").trigger_seq == [21, 22, 23, 24])


def test_with_trigger_changes_only_the_trigger(rng):
    seqs, val_start, test_start, items = _sequences(rng)
    splits = build_samples(seqs, val_start, test_start, items, SampleConfig(seq_len=5), 0)
    for name in ("val", "test"):
        built = getattr(splits, name)
        for mode, k in (("lag", 0), ("lag", 5), ("lag", 20), ("once", 0)):
            out = with_trigger(splits, name, mode, k)
            for field in ("user", "click_seq", "target", "label", "position"):
                assert getattr(out, field) is getattr(built, field)  # the very same rows
            assert out.trigger_seq.shape == built.trigger_seq.shape
            assert out.trigger_seq.dtype == np.int32
            # a positive and its negatives keep sharing one trigger
            group = out.trigger_seq.reshape(-1, 1 + 4, 5)
            assert np.all(group == group[:, :1])
        lag0 = with_trigger(splits, name, "lag", 0)
        np.testing.assert_array_equal(lag0.trigger_seq, built.trigger_seq)


def test_default_config_is_lag_zero_and_unchanged(rng):
    """The deployment fields at their defaults reproduce the samples made before they
    existed: the trigger is the sequence at the last sync (checked against the definition
    above), and naming the defaults or evaluation-only fields changes no byte."""
    seqs, val_start, test_start, items = _sequences(rng)
    base = build_samples(seqs, val_start, test_start, items, SampleConfig(), 5)
    same = build_samples(
        seqs, val_start, test_start, items,
        SampleConfig(train_lags=(0,), eval_lags=(0, 5, 20), eval_once=True), 5,
    )
    for name in ("train", "val", "test"):
        for field, array in getattr(base, name).arrays().items():
            assert array.tobytes() == getattr(same, name).arrays()[field].tobytes()
        built = getattr(base, name)
        np.testing.assert_array_equal(built.trigger_seq, built.click_seq)  # sync_every=1, lag 0
    assert base.fingerprint() == same.fingerprint()


def _train_lags_of(splits, seqs):
    """Each train/val positive's (position, trigger end), read off its trigger (items are
    distinct within a user, so the last trigger item locates the end)."""
    out = []
    for name in ("train", "val"):
        s = getattr(splits, name)
        for p in _positives(s):
            seq = seqs[s.user[p]]
            n = int((s.trigger_seq[p] > 0).sum())
            end = int(np.flatnonzero(seq == s.trigger_seq[p, n - 1])[0]) + 1
            out.append((int(s.position[p]), end))
    return np.array(out)


def test_train_lags_are_drawn_from_the_tuple_deterministically(rng):
    seqs, val_start, test_start, items = _sequences(rng, users=40, items=80)
    lags = (0, 2, 5)
    config = SampleConfig(seq_len=3, train_lags=lags)
    a = build_samples(seqs, val_start, test_start, items, config, seed=7)
    b = build_samples(seqs, val_start, test_start, items, config, seed=7)
    c = build_samples(seqs, val_start, test_start, items, config, seed=8)
    assert a.fingerprint() == b.fingerprint()
    assert not np.array_equal(a.train.trigger_seq, c.train.trigger_seq)
    pos_end = _train_lags_of(a, seqs)
    t, end = pos_end[:, 0], pos_end[:, 1]
    drawn = t - end
    clipped = end == 1  # min_history=1: t - lag < 1 lands on the first item
    assert np.all(np.isin(drawn[~clipped], lags))
    assert np.all(t[clipped] - 1 <= max(lags))
    assert set(drawn[~clipped]) == set(lags)  # every lag is drawn (hundreds of draws)
    # lag draws use their own stream: the rows themselves are those of train_lags=(0,)
    plain = build_samples(seqs, val_start, test_start, items, SampleConfig(seq_len=3), 7)
    for name in ("train", "val", "test"):
        for field in ("user", "click_seq", "target", "label"):
            np.testing.assert_array_equal(getattr(getattr(a, name), field),
                                          getattr(getattr(plain, name), field))
    # device-test is built at lag 0 whatever the training lags
    np.testing.assert_array_equal(a.test.trigger_seq, plain.test.trigger_seq)


def test_one_training_lag_shifts_every_trigger():
    train = _hand(train_lags=(3,)).train
    for p in _positives(train):
        end = max(int(train.position[p]) - 3, 1)
        expected = list(range(11 + max(0, end - 4), 11 + end))
        assert train.trigger_seq[p].tolist() == expected + [0] * (4 - len(expected))


def test_config_lists_become_tuples_and_variants_are_named():
    config = SampleConfig(train_lags=[0, 5], eval_lags=[0, 5, 20], eval_once=True)
    assert config.train_lags == (0, 5) and config.eval_lags == (0, 5, 20)
    assert config.trigger_variants() == (
        ("lag0", "lag", 0), ("lag5", "lag", 5), ("lag20", "lag", 20), ("once", "once", 0)
    )
    assert "eval_lags" not in config.build_fields() and "train_lags" in config.build_fields()
    assert config.needs_history and not SampleConfig().needs_history
    assert SampleConfig().trigger_variants() == ()
    # tuples survive dataclasses.asdict (the experiment config is built from it)
    assert dataclasses.asdict(SampleConfig())["train_lags"] == (0,)


@pytest.mark.parametrize(
    "field,value",
    [
        ("train_lags", ()),
        ("train_lags", (0, -1)),
        ("train_lags", 5),
        ("train_lags", (1.5,)),
        ("eval_lags", (True,)),
        ("eval_lags", (5, 5)),
        ("eval_once", 1),
    ],
)
def test_bad_deployment_fields_name_the_config_field(field, value):
    with pytest.raises(ConfigError, match=f"config.data.{field}"):
        SampleConfig(**{field: value})


def test_with_trigger_rejects_bad_arguments():
    splits = _hand()
    with pytest.raises(ValueError, match="mode 'always'"):
        with_trigger(splits, "test", "always")
    with pytest.raises(ValueError, match="lag -1"):
        with_trigger(splits, "test", "lag", -1)
    with pytest.raises(ValueError, match="once-per-device trigger has no lag"):
        with_trigger(splits, "test", "once", 5)
    with pytest.raises(ValueError, match="split 'dev'"):
        with_trigger(splits, "dev")


def test_authors_text_has_no_sequences_to_rebuild_triggers_from(tmp_path):
    splits = _hand()
    files = {}
    for name in ("train", "val", "test"):
        files[f"{name}_file"] = str(tmp_path / f"{name}.txt")
        authors_format.write_samples(files[f"{name}_file"], getattr(splits, name))
    loaded = authors_format.load_splits(**files, seq_len=4)
    for mode in ("lag", "once"):
        with pytest.raises(DataError, match="authors_text: no full user sequences"):
            with_trigger(loaded, "test", mode)
