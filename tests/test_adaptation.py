import numpy as np

from duet_jax.adaptation import device_triggers
from duet_jax.data.samples import SampleSet


def test_each_device_is_adapted_from_its_first_trigger_of_the_period():
    user = np.array([2, 0, 2, 0, 3], np.int32)
    trigger = np.arange(10, dtype=np.int32).reshape(5, 2)
    samples = SampleSet(user=user, click_seq=trigger, trigger_seq=trigger,
                        target=np.ones(5, np.int32), label=np.ones(5, np.float32))
    # users 0, 2, 3 in id order (user 1 has no rows); each one's first row in storage order
    np.testing.assert_array_equal(device_triggers(samples, 4), trigger[[1, 0, 4]])
