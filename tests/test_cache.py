"""The identity-checked store: records are reused only for the identity they were made for."""

import doctest

from duet_jax import cache


def test_doctests():
    assert doctest.testmod(cache).failed == 0


def test_record_without_a_later_field_is_reused_only_at_its_default(tmp_path):
    path = str(tmp_path / "cell.json")
    cache.save_record(path, {"config": {"lr": 0.1}}, {"auc": 0.8})
    defaults = {"config": {"lr": 0.5, "encoder": "gru"}}
    # the field "encoder" did not exist when the record was written
    same = {"config": {"lr": 0.1, "encoder": "gru"}}
    assert cache.load_record(path, same, defaults=defaults) == {"auc": 0.8}
    other = {"config": {"lr": 0.1, "encoder": "set"}}
    assert cache.load_record(path, other, defaults=defaults) is None
    # without defaults the new field is a difference
    assert cache.load_record(path, same) is None
    # defaults never override a value the record holds
    assert cache.load_record(path, {"config": {"lr": 0.5, "encoder": "gru"}},
                             defaults=defaults) is None


def test_cached_array_is_reused_only_for_its_identity_and_intact(tmp_path):
    import numpy as np

    path = str(tmp_path / "part.npy")
    calls = []

    def compute(value=1.0):
        calls.append(value)
        return np.full((2, 3), value, np.float32)

    first = cache.cached_array(path, {"lr": 0.1}, compute)
    again = cache.cached_array(path, {"lr": 0.1}, lambda: compute(2.0))
    np.testing.assert_array_equal(again, first)  # reused, not recomputed
    assert calls == [1.0] and again.dtype == np.float32
    # other inputs: recomputed (and stored for them)
    other = cache.cached_array(path, {"lr": 0.2}, lambda: compute(3.0))
    assert calls == [1.0, 3.0] and other[0, 0] == 3.0
    # a damaged array (digest differs from its record) is recomputed, not trusted
    np.save(path, np.zeros((2, 3), np.float32))
    assert cache.cached_array(path, {"lr": 0.2}, lambda: compute(4.0))[0, 0] == 4.0
    # an unreadable file, and an array whose record is missing (written, never vouched for)
    with open(path, "wb") as f:
        f.write(b"not an npy")
    assert cache.cached_array(path, {"lr": 0.2}, lambda: compute(5.0))[0, 0] == 5.0
    import os

    os.remove(path + ".json")
    assert cache.cached_array(path, {"lr": 0.2}, lambda: compute(6.0))[0, 0] == 6.0
    assert calls == [1.0, 3.0, 4.0, 5.0, 6.0]
