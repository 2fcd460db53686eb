"""Shared test helpers: tiny batches with realistic padding, and a tiny experiment config."""

from __future__ import annotations

import os

import numpy as np
import pytest

from experiments.configs import synthetic


def tiny_batch(rng: np.random.Generator, batch: int, seq_len: int, num_items: int) -> dict:
    """Right-padded sequences of mixed lengths, including an empty and a full one."""
    lengths = rng.integers(0, seq_len + 1, size=batch)
    lengths[0], lengths[-1] = 0, seq_len
    seq = rng.integers(1, num_items + 1, size=(batch, seq_len))
    seq[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0
    return {
        "click_seq": seq.astype(np.int32),
        "trigger_seq": np.roll(seq, 1, axis=0).astype(np.int32),
        "target": rng.integers(1, num_items + 1, size=batch).astype(np.int32),
        "label": rng.integers(0, 2, size=batch).astype(np.float32),
        "user": np.arange(batch, dtype=np.int32),
    }


def tiny_config():
    """The synthetic main-job config shrunk to run in seconds."""
    config = synthetic.get_config()
    config.data.num_users = 80
    config.data.num_items = 150
    config.data.num_categories = 6
    config.data.num_styles = 3
    config.data.cloud_len = (12, 16)
    config.data.device_len = (4, 6)
    config.embed_dim = 8
    config.seq_len = 10
    config.sasrec.num_heads = 2
    config.din.hidden = (16, 8)
    config.train.batch_size = 64
    config.train.eval_batch_size = 256
    config.train.num_epochs = 2
    config.train.checkpoint_every_steps = 7
    config.train.progress = False
    return config


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def real_data_dir():
    """The real raw files (``DUET_DATA_DIR``, set by .ci/run); skips when absent."""
    path = os.environ.get("DUET_DATA_DIR", "")
    if not path or not os.path.isdir(path):
        pytest.skip("DUET_DATA_DIR is not set to the real datasets' directory")
    return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One TFDS data directory shared by the session's real-data tests."""
    return str(tmp_path_factory.mktemp("tfds"))
