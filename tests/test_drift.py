"""Per-device drift scores and the gain by drift quartile."""

import doctest

import jax
import numpy as np

from duet_jax import drift
from duet_jax.models import ModelConfig, get_model


def test_docstring_example():
    assert doctest.testmod(drift).failed == 0


def test_scores_are_cosine_distances_of_period_centroids():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 3))
    # user 0: cloud {1, 2}, device {1, 2} -> 0; user 1: cloud {3}, device {4};
    # user 2: no device items -> NaN
    score = drift.drift_scores(emb, np.array([0, 0, 1, 2]), np.array([1, 2, 3, 5]),
                               np.array([0, 0, 1]), np.array([2, 1, 4]), num_users=3)
    a, b = emb[3], emb[4]
    want = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    # float64 sums of <= 2 terms and one division: a few ulps of 1.0
    assert abs(score[0]) < 1e-12 and abs(score[1] - want) < 1e-12
    assert np.isnan(score[2])


def test_item_embeddings_are_the_models_own():
    model = get_model("gru4rec", ModelConfig(num_items=9, seq_len=4, embed_dim=4))
    backbone = model.init(jax.random.key(0))["backbone"]
    emb = drift.item_embeddings(model, backbone, 9, batch_size=4)  # 3 batches, padded
    assert emb.shape == (10, 4)
    ids = np.zeros((10, 4), np.int32)
    ids[:, 0] = np.arange(10)
    want = np.asarray(model.embed_sequence(backbone, ids)[0][:, 0], np.float64)
    # the same per-row function at another batch shape: tanh of a 4-term dot product whose
    # terms are < 1 in size, so the two float32 results differ by at most ~2 * 4 * 2^-24 * 4
    # (plus tanh's own ulp); 1e-6 covers that with margin
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-6)


def test_quartiles_split_users_and_average_the_gain():
    d = np.arange(8, dtype=float)  # two users per quartile
    a = np.array([1, 1, 2, 2, 3, 3, 4, 5], float)
    b = np.zeros(8)
    out = drift.quartile_gains(d, a, b)
    assert [q["users"] for q in out] == [2, 2, 2, 2]
    assert [q["gain_mean"] for q in out] == [1.0, 2.0, 3.0, 4.5]  # exact small-integer means
    assert drift.quartile_gains(np.full(3, np.nan), a[:3], b[:3]) == []
