import numpy as np
import pytest

from duet_jax.data.samples import SampleConfig, with_trigger
from duet_jax.data.synthetic import SyntheticConfig, build_synthetic, generate_fleet
from duet_jax.errors import ConfigError

SMALL = SyntheticConfig(
    num_users=200,
    num_items=300,
    num_categories=8,
    num_styles=4,
    cloud_len=(15, 20),
    device_len=(5, 8),
)


def test_fleet_is_deterministic_per_seed():
    a, b, c = generate_fleet(SMALL, 1), generate_fleet(SMALL, 1), generate_fleet(SMALL, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences, strict=True))


def test_sequences_are_valid_and_split_at_the_drift():
    fleet = generate_fleet(SMALL, 0)
    for u, seq in enumerate(fleet.sequences):
        assert len(set(seq.tolist())) == len(seq)  # no repeats: negatives stay well-defined
        assert seq.min() >= 1 and seq.max() <= SMALL.num_items
        assert 0 < fleet.val_start[u] < fleet.cloud_len[u] < len(seq)
    assert np.all(fleet.style[:, 0] == 0)  # everyone starts mainstream


def test_styles_only_change_by_drift():
    fleet = generate_fleet(SMALL, 0)
    valid = fleet.style[:, 1:] >= 0
    changes = (fleet.style[:, 1:] != fleet.style[:, :-1]) & valid
    boundary = np.arange(1, fleet.style.shape[1])[None, :] == fleet.cloud_len[:, None]
    # drift=1: every device switches at its boundary; elsewhere at about drift_rate (a
    # frequency over thousands of seeded draws: sampling error, not float rounding)
    assert np.all(changes[boundary])
    assert changes[~boundary & valid].mean() == pytest.approx(SMALL.drift_rate, abs=0.01)
    still = generate_fleet(
        SyntheticConfig(**{**SMALL.__dict__, "drift": 0.0, "drift_rate": 0.0}), 0
    )
    assert np.all(still.style[still.style >= 0] == 0)


@pytest.mark.parametrize("drift,switched", [(1.0, 1.0), (0.0, 0.0)])
def test_drift_switches_device_styles(drift, switched):
    config = SyntheticConfig(**{**SMALL.__dict__, "drift": drift, "drift_rate": 0.0})
    fleet = generate_fleet(config, 0)
    assert np.mean(fleet.device_style != fleet.cloud_style) == switched


def _oracle_auc(fleet, style_of, samples):
    """AUC of the true next-item score given a style per user (test split)."""
    from duet_jax.metrics import auc

    s = samples.test
    last = s.click_seq[np.arange(len(s.label)), (s.click_seq > 0).sum(1) - 1] - 1
    v = fleet.item_vec
    moved = np.einsum("nij,nj->ni", fleet.styles[style_of[s.user]], v[last])
    score = (
        SMALL.transition_strength * (moved * v[s.target - 1]).sum(1)
        + SMALL.preference_strength * (fleet.device_pref[s.user] * v[s.target - 1]).sum(1)
        + SMALL.popularity_strength * fleet.log_pop[s.target - 1]
    )
    return auc(s.label, score)


def test_drift_is_genuine_the_device_period_needs_the_new_style():
    """On device-test, the true (drifted) style predicts clearly better than the stale one."""
    from duet_jax.data.samples import build_samples

    # drift_rate=0: one style per period, so "the" device style is well defined
    fleet = generate_fleet(SyntheticConfig(**{**SMALL.__dict__, "drift_rate": 0.0}), 0)
    samples = build_samples(
        fleet.sequences, fleet.val_start, fleet.cloud_len, fleet.num_items, SampleConfig(), 1
    )
    fresh = _oracle_auc(fleet, fleet.device_style, samples)
    stale = _oracle_auc(fleet, fleet.cloud_style, samples)
    assert fresh > stale + 0.05


def test_build_synthetic_splits_device_period_as_test():
    splits = build_synthetic(SMALL, SampleConfig(), seed=0)
    fleet = generate_fleet(SMALL, 0)
    n_device = sum(len(s) - c for s, c in zip(fleet.sequences, fleet.cloud_len, strict=True))
    assert splits.stats()["test_positives"] == n_device
    assert splits.num_users == SMALL.num_users


def test_once_per_device_trigger_is_the_cloud_period():
    splits = build_synthetic(SMALL, SampleConfig(seq_len=6), seed=0)
    fleet = generate_fleet(SMALL, 0)
    once = with_trigger(splits, "test", "once")
    for u in range(0, SMALL.num_users, 17):
        cloud = fleet.sequences[u][: fleet.cloud_len[u]]
        assert np.all(once.trigger_seq[once.user == u] == cloud[-6:])  # cloud_len >= 15 > 6
    lag3 = with_trigger(splits, "test", "lag", 3)
    np.testing.assert_array_equal(lag3.click_seq, splits.test.click_seq)
    p = np.flatnonzero(lag3.label == 1)
    t = lag3.position[p]
    seq = [fleet.sequences[u] for u in lag3.user[p]]
    expected = np.stack([s[i - 3 - 6 : i - 3] for s, i in zip(seq, t, strict=True)])
    np.testing.assert_array_equal(lag3.trigger_seq[p], expected)  # t - 3 >= 12 > 6 items


@pytest.mark.parametrize(
    "field,value", [("drift", 1.5), ("cloud_len", (5, 2)), ("num_users", 0), ("val_frac", 1.0)]
)
def test_bad_synthetic_config_names_field(field, value):
    with pytest.raises(ConfigError, match=f"config.data.{field}"):
        SyntheticConfig(**{**SMALL.__dict__, field: value})
