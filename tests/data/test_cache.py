"""Cached samples: reused for the same key, rebuilt for another, never half-written."""

import os

import numpy as np
import pytest

from duet_jax.data import cache
from duet_jax.data.samples import SampleConfig, build_samples, with_trigger


def splits():
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([6, 5, 4, 3, 2, 1, 7])]
    out = build_samples(seqs, np.array([3, 4]), np.array([4, 5]), 20, SampleConfig(seq_len=4), 0)
    out.info = {"dataset": "toy", "users": 2}
    return out


def test_second_call_loads_instead_of_building(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return splits()

    key = {"dataset": "toy", "seed": 0}
    first = cache.cached_splits(str(tmp_path), key, build)
    second = cache.cached_splits(str(tmp_path), key, build)
    assert len(calls) == 1
    assert first.fingerprint() == second.fingerprint()
    assert second.info == first.info and second.num_items == 20
    cache.cached_splits(str(tmp_path), {"dataset": "toy", "seed": 1}, build)
    assert len(calls) == 2  # another key builds again


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        cache.cached_splits(str(tmp_path), {"dataset": "toy"}, splits)
    assert os.listdir(tmp_path) == []


def test_cache_keeps_what_with_trigger_needs(tmp_path):
    """Positions and users' full sequences round-trip, so a loaded split rebuilds the same
    lagged and once-per-device triggers as the freshly built one."""
    key = {"dataset": "toy"}
    built = cache.cached_splits(str(tmp_path), key, splits)
    loaded = cache.cached_splits(str(tmp_path), key, lambda: pytest.fail("rebuilt"))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(loaded, name).position, getattr(built, name).position)
    for field in ("items", "offsets", "val_start", "test_start", "min_history", "sync_every"):
        np.testing.assert_array_equal(getattr(loaded.history, field), getattr(built.history, field))
    for mode, lag in (("lag", 0), ("lag", 2), ("once", 0)):
        np.testing.assert_array_equal(
            with_trigger(loaded, "test", mode, lag).trigger_seq,
            with_trigger(built, "test", mode, lag).trigger_seq,
        )


def test_splits_without_history_round_trip(tmp_path):
    def bare():
        out = splits()
        out.history = None
        out.test.position = None
        return out

    loaded = cache.cached_splits(str(tmp_path), {"dataset": "toy"}, bare)
    loaded = cache.cached_splits(str(tmp_path), {"dataset": "toy"}, bare)
    assert loaded.history is None and loaded.test.position is None
    assert loaded.train.position is not None
