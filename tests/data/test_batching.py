import numpy as np

from duet_jax.data import batching
from duet_jax.data.samples import SampleSet


def _samples(n):
    return SampleSet(
        user=np.arange(n, dtype=np.int32),
        click_seq=np.ones((n, 3), np.int32),
        trigger_seq=np.ones((n, 3), np.int32),
        target=np.arange(n, dtype=np.int32),
        label=np.ones(n, np.float32),
    )


def test_batches_cover_every_sample_once_with_fixed_shape():
    samples = _samples(10)
    seen = []
    for batch in batching.batches(samples, 4):
        assert batch["target"].shape == (4,)
        seen.extend(batch["target"][batch["weight"] > 0].tolist())
    assert sorted(seen) == list(range(10))
    assert batching.num_batches(10, 4) == 3


def test_padding_rows_have_zero_weight():
    batch = batching.padded_batch(_samples(10), np.array([3, 4]), 4)
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0, 0])


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = batching.epoch_order(100, 0, 3)
    np.testing.assert_array_equal(a, batching.epoch_order(100, 0, 3))
    assert not np.array_equal(a, batching.epoch_order(100, 0, 4))
    assert sorted(a) == list(range(100))


def test_batches_resume_from_a_batch_number():
    samples = _samples(10)
    order = batching.epoch_order(10, 1, 0)
    all_batches = list(batching.batches(samples, 4, order))
    resumed = list(batching.batches(samples, 4, order, start=1))
    for a, b in zip(all_batches[1:], resumed, strict=True):
        np.testing.assert_array_equal(a["target"], b["target"])
