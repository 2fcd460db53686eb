"""The fleet-memory benchmark's synthetic fleet is a valid fleet: grouped by device, one
event per window, a positive then a negative each."""

import numpy as np

from duet_jax.fleet import build_streams
from experiments.benchmark.fleet_memory import synthetic_samples


def test_synthetic_fleet_has_the_asked_devices_events_and_rounds():
    samples = synthetic_samples(devices=5, events=3, seq_len=4, num_items=20, seed=0)
    assert len(samples) == 5 * 3 * 2
    streams = build_streams(samples, num_rounds=3)
    assert streams.num_devices == 5 and len(streams.seq) == 15
    # each device's 3 events fall in rounds 0, 1, 2, and its windows slide by one item
    np.testing.assert_array_equal(streams.round.reshape(5, 3), np.tile([0, 1, 2], (5, 1)))
    seq = streams.seq.reshape(5, 3, 4)
    np.testing.assert_array_equal(seq[:, 1, :-1], seq[:, 0, 1:])
    assert samples.label.tolist()[:2] == [1.0, 0.0]
    assert samples.click_seq.min() >= 1 and samples.target.max() <= 20
