import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.models import layers
from tests import numpy_reference as ref

EPS = 2.0**-24  # float32 unit roundoff


def test_dense_per_example_weights_apply_each_row_its_own_kernel(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    kernels = rng.normal(size=(3, 4, 5)).astype(np.float32)
    biases = rng.normal(size=(3, 5)).astype(np.float32)
    got = np.asarray(layers.dense({"kernel": kernels, "bias": biases}, x), np.float64)
    x64, k64, b64 = (a.astype(np.float64) for a in (x, kernels, biases))
    want = np.stack([x64[b] @ k64[b] + b64[b] for b in range(3)])
    # exact float32 inputs; a dot of 4 products plus the bias is within 5 * eps of the sum
    # of |terms| in any summation order; times 4 for safety
    scale = np.stack([np.abs(x64[b]) @ np.abs(k64[b]) + np.abs(b64[b]) for b in range(3)])
    assert np.all(np.abs(got - want) <= 4 * 5 * EPS * scale)


def test_dense_rejects_bad_kernel_rank():
    with pytest.raises(ValueError, match="kernel"):
        layers.dense({"kernel": jnp.zeros((2, 2, 2, 2)), "bias": jnp.zeros(2)}, jnp.zeros((2, 2)))


def test_embedding_padding_row_is_zero_and_gets_no_gradient():
    table = layers.embedding_init(jax.random.key(0), 5, 3)
    # exact: the row is set to 0, and masking multiplies by exactly 0 or 1
    np.testing.assert_array_equal(table[0], 0.0)
    grad = jax.grad(lambda t: layers.embed(t, jnp.array([0, 2, 0])).sum())(table + 1.0)
    np.testing.assert_array_equal(grad[0], 0.0)
    np.testing.assert_array_equal(grad[2], 1.0)


@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
def test_gru_matches_numpy_reference_for_any_leading_shape(rng, batch_shape):
    params = layers.gru_init(jax.random.key(1), 5, 6)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    x = rng.normal(size=(*batch_shape, 7, 5)).astype(np.float32)
    lengths = rng.integers(0, 8, size=batch_shape)
    mask = np.arange(7) < lengths[..., None]
    got = np.asarray(layers.gru(params, x, mask))
    flat_x, flat_len = x.reshape(-1, 7, 5), lengths.reshape(-1)
    want = np.stack(
        [ref.gru_last(ref.f64(params), flat_x[i], flat_len[i]) for i in range(len(flat_len))]
    ).reshape(*batch_shape, 6)
    # Each step's gate pre-activations are dots of 5 input and 6 state terms plus 2 biases:
    # <= 13 eps times their sum of |terms| (<= ~4 here: |x| ~ N(0, 1), |state| < 1, weights
    # <= 0.75), and the gate and update arithmetic adds a few eps more: ~80 eps per step on
    # a state bounded by 1. Over 7 steps (first order, errors adding): ~560 eps ~ 3.3e-5,
    # times 3 for safety -> 1e-4; a wrong gate or bias would be off by O(0.1).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_masked_softmax_all_masked_row_is_zero_not_nan():
    w = layers.masked_softmax(
        jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[False, False], [True, False]])
    )
    np.testing.assert_array_equal(w, [[0.0, 0.0], [1.0, 0.0]])  # exp(0) / 1: exact
    grad = jax.grad(lambda s: layers.masked_softmax(s, jnp.array([[False, True]])).sum())(
        jnp.array([[1.0, 2.0]])
    )
    assert np.all(np.isfinite(grad))


def test_transformer_layer_at_last_position_equals_full_layer_row(rng):
    params = layers.transformer_layer_init(jax.random.key(2), 8, 16)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    full = layers.transformer_layer(params, x, x, 2, None)
    last = layers.transformer_layer(params, x[:, -1:], x, 2, None)
    # A float32 output is a chain of ~100 roundings (dots of 8, 4, 5, 8, 16 terms, softmax,
    # two layer norms) on values of size ~3 (unit-variance inputs, Glorot weights, layer
    # norm): |err| <= ~100 * eps * 3 ~ 1.8e-5 per side (any summation order: the row's
    # kernel may differ from the full layer's). Two float32 sides, times 2 for safety -> 1e-4;
    # against the float64 reference, one side, times 4 -> 1e-4 too.
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-4)
    want = np.stack([ref.transformer_layer(ref.f64(params), x[b], 2, None) for b in range(3)])
    np.testing.assert_allclose(full, want, rtol=0, atol=1e-4)


def test_last_valid_takes_position_len_minus_one():
    x = jnp.arange(2 * 4).reshape(2, 4, 1).astype(jnp.float32)
    mask = jnp.array([[True, True, False, False], [False, False, False, False]])
    np.testing.assert_array_equal(layers.last_valid(x, mask)[:, 0], [1.0, 4.0])
