"""The stabiliser: numpy reference for both softmax choices; M = 1 is the plain generator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import generator as gen_lib
from duet_jax.paramspec import HeadSpec
from duet_jax.stabiliser import stabilise
from tests import tolerances as tol
from tests.test_generator import ODD_TEMPLATE, _generator_roundings


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


def _atol(c: np.ndarray, over: str) -> float:
    """Float32 ``stabilise(c)`` vs exact. A score ``s = c_m . c_j / sqrt(C)`` is off by at
    most ``ds = gamma(C + 1) max sum_c |c_m c_j| / sqrt(C)``; softmax turns that absolute error
    into a relative one of ``2 ds`` in each weight (numerator and denominator), plus its own
    sum (M terms); the mean over m (M) and the mixture over j (M) add ``gamma(2 M)``. The
    output is a weighted sum of |c| <= max|c| with weights summing to <= 1 ("candidates":
    a convex combination) or <= M ("rows": each weight <= 1)."""
    m = c.shape[0]
    rows = c.shape[1] if c.ndim >= 3 else 1
    flat = np.abs(c.reshape(m, rows, -1).astype(np.float64))
    width = flat.shape[-1]
    ds = tol.gamma(width + 1) * np.einsum("mrc,jrc->mjr", flat, flat).max() / np.sqrt(width)
    relative = 2 * ds + tol.gamma(tol.path_roundings(m, m, m))
    weight_sum = 1 if over == "candidates" else m
    return tol.SAFETY * relative * weight_sum * flat.max()


@pytest.mark.parametrize("over", ["candidates", "rows"])
@pytest.mark.parametrize("shape", [(4, 3), (5,), (2, 3, 2)])
def test_matches_float64_reference(rng, over, shape):
    c = rng.normal(size=(3, *shape)).astype(np.float32)
    tol.assert_within(stabilise(jnp.asarray(c), over), _reference(c, over), _atol(c, over))


def test_softmax_over_candidates_is_a_mixture_and_over_rows_is_not(rng):
    c = np.repeat(rng.normal(size=(1, 4, 3)), 5, axis=0).astype(np.float32)
    # identical candidates: the paper's mixture gives the candidate back ...
    tol.assert_within(stabilise(jnp.asarray(c), "candidates"), c[0], _atol(c, "candidates"))
    # ... the authors' softmax over rows rescales each row by M * softmax_r(|c_r|^2 / sqrt C)
    c0 = c[0].astype(np.float64)
    norms = (c0**2).sum(-1) / np.sqrt(3)
    scale = 5 * np.exp(norms - norms.max()) / np.exp(norms - norms.max()).sum()
    tol.assert_within(stabilise(jnp.asarray(c), "rows"), c0 * scale[:, None], _atol(c, "rows"))


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
    # M = 1 mixes exactly (softmax of one score is exp(0) / 1 = 1), so the two differ only
    # in how the decoder's matmul is laid out: two float32 evaluations of the generator
    atol = tol.f32_pair_atol(_generator_roundings(), tol.MODEL_SCALE)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        tol.assert_leaf_within(x, y, atol)


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
