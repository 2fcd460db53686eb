"""Cached samples: reused for the same key, rebuilt for another, never half-written."""

import os

import numpy as np
import pytest

from duet_jax.data import cache
from duet_jax.data.samples import SampleConfig, build_samples


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
