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
