"""The set encoder: permutation-invariant, padding masked."""

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.encoders import SetEncoder, encoder_names, get_encoder
from tests import tolerances as tol

L, D, H, Z = 7, 5, 6, 3
# Longest path: phi = Dense(D), the masked mean (L terms) or the attention softmax (L) and
# its weighted sum (L), dense1 on [mean; attn] (2H), dense2 (H). Activations are ReLU/tanh
# outputs of unit-scale inputs, so sums of |terms| stay below MODEL_SCALE.
ROUNDINGS = tol.path_roundings(D, L, L, 2 * H, H)


def _setup():
    enc = get_encoder("set", H, Z)
    x = jax.random.normal(jax.random.key(0), (L, D))
    params = enc.init(jax.random.key(1), x, jnp.ones(L, bool))
    return enc, params, x


def test_registered():
    assert "set" in encoder_names() and isinstance(get_encoder("set", H, Z), SetEncoder)


def test_permutation_invariant():
    enc, params, x = _setup()
    mask = jnp.arange(L) < 5
    z = enc.apply(params, x, mask)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(L)
        z_perm = enc.apply(params, x[perm], mask[perm])
        tol.assert_within(z_perm, z, tol.f32_pair_atol(ROUNDINGS, tol.MODEL_SCALE), "perm")
    # a real dependence on the rows (the test could fail): another set gives another z
    assert np.abs(np.asarray(enc.apply(params, -x, mask) - z)).max() > 1e-3


def test_padding_is_masked():
    enc, params, x = _setup()
    mask = jnp.arange(L) < 4
    z = enc.apply(params, x, mask)
    garbage = x.at[4:].set(1e3 * jax.random.normal(jax.random.key(5), (L - 4, D)))
    # padded rows enter with weight exactly 0: the same program gives bitwise the same z
    np.testing.assert_array_equal(enc.apply(params, garbage, mask), z)
    # and the set without its padding (another length, so another summation order)
    z_short = enc.apply(params, x[:4], jnp.ones(4, bool))
    tol.assert_within(z_short, z, tol.f32_pair_atol(ROUNDINGS, tol.MODEL_SCALE), "unpadded")


def test_all_padded_set_is_finite():
    enc, params, x = _setup()
    assert np.isfinite(np.asarray(enc.apply(params, x, jnp.zeros(L, bool)))).all()
