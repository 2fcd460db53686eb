"""The stabiliser: numpy reference for both softmax choices; M = 1 is the plain generator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import generator as gen_lib
from duet_jax.paramspec import HeadSpec
from duet_jax.stabiliser import stabilise
from tests.test_generator import ODD_TEMPLATE


def _reference(c: np.ndarray, over: str) -> np.ndarray:
    """Loops in float64: out[r] = mean_m sum_j a[m, j, r] c[j, r]."""
    m_count, shape = c.shape[0], c.shape[1:]
    rows = shape[0] if len(shape) >= 2 else 1
    c = c.reshape(m_count, rows, -1).astype(np.float64)
    s = np.zeros((m_count, m_count, rows))
    for m in range(m_count):
        for j in range(m_count):
            for r in range(rows):
                s[m, j, r] = c[m, r] @ c[j, r] / np.sqrt(c.shape[-1])
    axis = 1 if over == "candidates" else 2
    a = np.exp(s - s.max(axis=axis, keepdims=True))
    a /= a.sum(axis=axis, keepdims=True)
    out = np.zeros(c.shape[1:])
    for m in range(m_count):
        for j in range(m_count):
            out += a[m, j][:, None] * c[j] / m_count
    return out.reshape(shape)


@pytest.mark.parametrize("over", ["candidates", "rows"])
@pytest.mark.parametrize("shape", [(4, 3), (5,), (2, 3, 2)])
def test_matches_float64_reference(rng, over, shape):
    c = rng.normal(size=(3, *shape)).astype(np.float32)
    np.testing.assert_allclose(stabilise(jnp.asarray(c), over), _reference(c, over),
                               rtol=1e-5, atol=1e-6)


def test_softmax_over_candidates_is_a_mixture_and_over_rows_is_not(rng):
    c = np.repeat(rng.normal(size=(1, 4, 3)), 5, axis=0).astype(np.float32)
    # identical candidates: the paper's mixture gives the candidate back ...
    np.testing.assert_allclose(stabilise(jnp.asarray(c), "candidates"), c[0], rtol=1e-6)
    # ... the authors' softmax over rows rescales each row by M * softmax_r(|c_r|^2 / sqrt C)
    norms = (c[0] ** 2).sum(-1) / np.sqrt(3)
    scale = 5 * np.exp(norms - norms.max()) / np.exp(norms - norms.max()).sum()
    np.testing.assert_allclose(stabilise(jnp.asarray(c), "rows"), c[0] * scale[:, None],
                               rtol=1e-5)


def test_stabiliser_with_one_candidate_equals_the_plain_generator(rng):
    spec = HeadSpec.from_template(ODD_TEMPLATE)
    plain = gen_lib.ParameterGenerator(spec=spec, hidden_dim=6, z_dim=5)
    stab = gen_lib.ParameterGenerator(spec=spec, hidden_dim=6, z_dim=5, stabiliser=1)
    params = gen_lib.init_generator(plain, jax.random.key(0), 7, 4)
    # the same decoders, as the single candidate of each
    stab_params = jax.tree_util.tree_map_with_path(
        lambda path, x: x[None] if "decoder_" in jax.tree_util.keystr(path) else x, params
    )
    expected = jax.tree.map(jnp.shape, gen_lib.init_generator(stab, jax.random.key(0), 7, 4))
    assert jax.tree.map(jnp.shape, stab_params) == expected
    features = rng.normal(size=(6, 7, 4)).astype(np.float32)
    mask = np.arange(7)[None] < rng.integers(0, 8, size=6)[:, None]
    a = jax.jit(functools.partial(gen_lib.generate, plain))(params, features, mask)
    b = jax.jit(functools.partial(gen_lib.generate, stab))(stab_params, features, mask)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=1e-6, atol=1e-7)


def test_candidates_differ_and_the_output_keeps_the_template(rng):
    spec = HeadSpec.from_template(ODD_TEMPLATE)
    gen = gen_lib.ParameterGenerator(spec=spec, hidden_dim=6, z_dim=5, stabiliser=4)
    params = gen_lib.init_generator(gen, jax.random.key(0), 7, 4)
    kernel = params["params"]["decoder_layers__0__kernel"]["kernel"]
    assert kernel.shape == (4, 5, 12)
    assert not np.allclose(kernel[0], kernel[1])  # independent candidates
    heads = jax.jit(functools.partial(gen_lib.generate, gen))(
        params, rng.normal(size=(3, 7, 4)).astype(np.float32), np.ones((3, 7), bool)
    )
    assert jax.tree.structure(heads) == jax.tree.structure(ODD_TEMPLATE)
