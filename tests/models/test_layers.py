import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.models import layers
from tests import numpy_reference as ref


def test_dense_per_example_weights_apply_each_row_its_own_kernel(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    kernels = rng.normal(size=(3, 4, 5)).astype(np.float32)
    biases = rng.normal(size=(3, 5)).astype(np.float32)
    got = layers.dense({"kernel": kernels, "bias": biases}, x)
    want = np.stack([x[b] @ kernels[b] + biases[b] for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dense_rejects_bad_kernel_rank():
    with pytest.raises(ValueError, match="kernel"):
        layers.dense({"kernel": jnp.zeros((2, 2, 2, 2)), "bias": jnp.zeros(2)}, jnp.zeros((2, 2)))


def test_embedding_padding_row_is_zero_and_gets_no_gradient():
    table = layers.embedding_init(jax.random.key(0), 5, 3)
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
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_masked_softmax_all_masked_row_is_zero_not_nan():
    w = layers.masked_softmax(
        jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[False, False], [True, False]])
    )
    np.testing.assert_array_equal(w, [[0.0, 0.0], [1.0, 0.0]])
    grad = jax.grad(lambda s: layers.masked_softmax(s, jnp.array([[False, True]])).sum())(
        jnp.array([[1.0, 2.0]])
    )
    assert np.all(np.isfinite(grad))


def test_transformer_layer_at_last_position_equals_full_layer_row(rng):
    params = layers.transformer_layer_init(jax.random.key(2), 8, 16)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    full = layers.transformer_layer(params, x, x, 2, None)
    last = layers.transformer_layer(params, x[:, -1:], x, 2, None)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    want = np.stack([ref.transformer_layer(ref.f64(params), x[b], 2, None) for b in range(3)])
    np.testing.assert_allclose(full, want, rtol=1e-4, atol=1e-5)


def test_last_valid_takes_position_len_minus_one():
    x = jnp.arange(2 * 4).reshape(2, 4, 1).astype(jnp.float32)
    mask = jnp.array([[True, True, False, False], [False, False, False, False]])
    np.testing.assert_array_equal(layers.last_valid(x, mask)[:, 0], [1.0, 4.0])
