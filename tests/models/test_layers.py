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


def _gru_previous(params, x, mask):
    """The GRU as it was before the faster one (kept to check that speed changed nothing
    beyond float rounding): jax.nn.sigmoid, recurrent biases added in every step."""
    hidden = params["kernel_hh"].shape[0]

    def gate(name, i):
        cols = slice(i * hidden, (i + 1) * hidden)
        return params[f"kernel_{name}"][:, cols], params[f"bias_{name}"][cols]

    x_time = jnp.moveaxis(x, -2, 0)
    x_gates = [x_time @ w + b for w, b in (gate("ih", i) for i in range(3))]
    (w_r, b_r), (w_z, b_z), (w_n, b_n) = (gate("hh", i) for i in range(3))

    def step(h, inputs):
        x_r, x_z, x_n, m = inputs
        r = jax.nn.sigmoid(x_r + h @ w_r + b_r)
        z = jax.nn.sigmoid(x_z + h @ w_z + b_z)
        n = jnp.tanh(x_n + r * (h @ w_n + b_n))
        return jnp.where(m[..., None], (1.0 - z) * n + z * h, h), None

    h0 = jnp.zeros((*x.shape[:-2], hidden), x.dtype)
    return jax.lax.scan(step, h0, (*x_gates, jnp.moveaxis(mask, -1, 0)))[0]


@pytest.mark.parametrize("unroll", [1, 3])
def test_faster_gru_equals_previous_implementation(rng, unroll):
    # the generator's sizes: L = 30 steps, D = H = 32, a batch of 64 sequences, lengths 0..30
    params = layers.gru_init(jax.random.key(2), 32, 32)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    x = rng.normal(size=(64, 30, 32)).astype(np.float32)
    mask = np.arange(30) < rng.integers(0, 31, size=64)[:, None]
    got = np.asarray(jax.jit(lambda p, x, m: layers.gru(p, x, m, unroll=unroll))(params, x, mask))
    want = np.asarray(jax.jit(_gru_previous)(params, x, mask))
    # Both are float32 evaluations of the same equations that differ only in rounding:
    # sigmoid as 0.5 tanh(x/2) + 0.5 (a few eps of its output <= 1), the recurrent r/z biases
    # summed before the input projection rather than after (one reordered float32 add: eps
    # times |pre-activation| <= ~10 here, 32 inputs ~N(0, 1) times weights <= ~0.5), and
    # (1 - z) n + z h as n + z (h - n) (~3 eps on |h| < 1). Per step that is <= ~40 eps of
    # new error on a state bounded by 1; the GRU map is contractive-to-mildly-expanding in h
    # (|dh'/dh| <~ 1 + |W_hh| terms ~2), so over 30 steps the first-order sum stays below
    # ~30 * 40 * 2 eps ~ 1.4e-4, so 2e-4 absolute (what we see is ~1e-6); a changed
    # equation (wrong bias, gate, or mask) moves the state by O(0.1).
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    # the zero-length rows stay exactly zero in both
    empty = ~mask.any(axis=1)
    assert np.all(got[empty] == 0.0)


def test_sigmoid_is_the_logistic_function():
    x = np.linspace(-30, 30, 2001, dtype=np.float32)
    # 0.5 tanh(x/2) + 0.5 is an identity for the logistic function; in float32 both forms
    # are within a few eps of the true value (<= 1), so 4 * 2^-24 * 4 ~ 1e-6 bounds it
    np.testing.assert_allclose(np.asarray(layers.sigmoid(x)),
                               1.0 / (1.0 + np.exp(-x.astype(np.float64))), rtol=0, atol=1e-6)
