"""Low-rank decoders: applying U C V factor by factor equals applying the formed weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.duet import Duet
from duet_jax.generator import low_rank_for
from duet_jax.lowrank import LowRankKernel, materialize
from duet_jax.models import ModelConfig, get_model, layers
from tests.conftest import tiny_batch

EPS = 2.0**-24  # float32 unit roundoff


def test_dense_applies_shared_and_per_example_cores(rng):
    u, v = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
    bias = rng.normal(size=(5,))
    x = rng.normal(size=(4, 3, 6))

    def check(got, core, b, x_):
        """``got`` (float32) against the float64 product ``x (u core v) + b``.

        A dot of K float32 terms is within K * eps * sum|a_i * b_i| of the exact sum, in any
        summation order; composed over ((x @ u) @ core) @ v that is (6 + 2 + 2) * eps times
        the sum of |products| ``|x| |u| |core| |v|``. Rounding the float64 inputs to float32
        adds 4 * eps (four factors per product), the bias 2 * eps (its rounding and the add):
        16 * eps in all, times 4 for safety (the bound is first order).
        """
        want = x_ @ (u @ core @ v) + b
        scale = np.abs(x_) @ (np.abs(u) @ np.abs(core) @ np.abs(v)) + np.abs(b)
        assert got.shape == want.shape
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 4 * 16 * EPS * scale)

    core = rng.normal(size=(2, 2))
    shared = LowRankKernel(u=jnp.asarray(u), core=jnp.asarray(core), v=jnp.asarray(v))
    got = layers.dense({"kernel": shared, "bias": jnp.asarray(bias)}, jnp.asarray(x))
    check(got, core, bias, x)

    cores = rng.normal(size=(4, 2, 2))
    per = LowRankKernel(u=jnp.asarray(u), core=jnp.asarray(cores), v=jnp.asarray(v))
    biases = rng.normal(size=(4, 5))
    got = layers.dense({"kernel": per, "bias": jnp.asarray(biases)}, jnp.asarray(x))
    assert per.shape == (4, 6, 5)
    for b in range(4):
        check(got[b], cores[b], biases[b], x[b])


def test_layers_take_a_low_rank_kernel_as_a_kernel_operator():
    kernel = LowRankKernel(u=jnp.ones((3, 1)), core=jnp.ones((1, 1)), v=jnp.ones((1, 2)))
    assert isinstance(kernel, layers.KernelOperator)
    assert not isinstance(jnp.ones((3, 2)), layers.KernelOperator)
    # sums of three ones: exact in float32
    np.testing.assert_array_equal(layers.matmul(jnp.ones((4, 3)), kernel), np.full((4, 2), 3.0))


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "din"])
def test_low_rank_apply_equals_applying_the_materialised_weight(name, rng):
    model = get_model(name, ModelConfig(num_items=40, seq_len=6, embed_dim=16, num_heads=2,
                                        din_hidden=(24, 12)))
    duet = Duet.create(model, low_rank=4)
    params = duet.init(jax.random.key(0))
    batch = tiny_batch(rng, 7, 6, 40)
    heads = jax.jit(duet.generate)(params, batch["trigger_seq"])
    low = jax.tree.leaves(heads, is_leaf=lambda x: isinstance(x, LowRankKernel))
    kernels = [k for k in low if isinstance(k, LowRankKernel)]
    assert kernels, "some leaf must be low-rank"
    for k in kernels:  # U, V shared: not copied per device
        assert k.u.ndim == 2 and k.v.ndim == 2 and k.core.shape == (7, 4, 4)
    full = materialize(heads)
    template = model.head_template()
    assert jax.tree.structure(full) == jax.tree.structure(template)
    for leaf, spec in zip(jax.tree.leaves(full), jax.tree.leaves(template), strict=True):
        assert leaf.shape == (7, *spec.shape)
    # The two sides differ only in the generated layers' products: ((x U) C) V against
    # x (U C V). Each side of a layer with n inputs is within (n + 2k) * eps * |x||U||C||V| of
    # the exact product (dot-product error bound, composed); random U, V make |U||C||V| about
    # k times |U C V|, so a layer's outputs differ by <= 2 (n + 2k) k eps of their size:
    # 640 eps for n <= 32 (DIN's 2D input), k = 4. Two such layers, then tanh (1-Lipschitz)
    # and Glorot-scaled layers that keep magnitudes: <= 1,280 eps ~ 7.6e-5 of the logits'
    # size, which the batch's largest logit measures (fixed test data: the same on any
    # machine). Rounded up to 1e-4; a wrong factor order would be off by O(1).
    low_rank_logits = np.asarray(jax.jit(duet.apply)(params, batch))
    full_logits = np.asarray(jax.jit(model.apply)(params["backbone"], full, batch))
    scale = np.abs(full_logits).max()
    assert scale > 0
    np.testing.assert_allclose(low_rank_logits, full_logits, rtol=0, atol=1e-4 * scale)


def test_low_rank_generates_fewer_values_and_trains():
    model = get_model("sasrec", ModelConfig(num_items=40, seq_len=6))
    full, low = Duet.create(model), Duet.create(model, low_rank=8)

    def decoder_size(duet):
        params = duet.init(jax.random.key(0))["generator"]["params"]
        return sum(x.size for k, v in params.items() if k.startswith("decoder_")
                   for x in jax.tree.leaves(v))

    # decoders write 8 * 8 = 64 core values instead of 32 * 32 = 1,024 per matrix leaf:
    # 2 * (32 * 64 + 64 + 2 * 256) + 2 * (32 * 32 + 32) = 7,360 against 69,696 parameters
    assert decoder_size(low) == 7_360 and decoder_size(full) == 69_696
    assert low_rank_for((32, 32), 8) and not low_rank_for((64, 1), 8)
    assert not low_rank_for((32,), 8) and not low_rank_for((8, 32), 8)
    params = low.init(jax.random.key(0))
    batch = tiny_batch(np.random.default_rng(0), 5, 6, 40)
    # jitted: one compilation instead of op-by-op dispatch of the eager gradient (slow)
    grads = jax.jit(jax.grad(lambda p: low.apply(p, batch).sum()))(params)
    dec = grads["generator"]["params"]["decoder_dense1__kernel"]
    assert float(jnp.abs(dec["u"]).sum()) > 0 and float(jnp.abs(dec["kernel"]).sum()) > 0
