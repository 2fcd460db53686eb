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


def test_dense_applies_shared_and_per_example_cores(rng):
    u, v = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
    bias = rng.normal(size=(5,))
    x = rng.normal(size=(4, 3, 6))
    shared = LowRankKernel(u=jnp.asarray(u), core=jnp.asarray(rng.normal(size=(2, 2))),
                           v=jnp.asarray(v))
    want = x @ (u @ np.asarray(shared.core) @ v) + bias
    got = layers.dense({"kernel": shared, "bias": jnp.asarray(bias)}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    cores = rng.normal(size=(4, 2, 2))
    per = LowRankKernel(u=jnp.asarray(u), core=jnp.asarray(cores), v=jnp.asarray(v))
    biases = rng.normal(size=(4, 5))
    want = np.stack([x[b] @ (u @ cores[b] @ v) + biases[b] for b in range(4)])
    got = layers.dense({"kernel": per, "bias": jnp.asarray(biases)}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert per.shape == (4, 6, 5)


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
    np.testing.assert_allclose(
        jax.jit(duet.apply)(params, batch),
        jax.jit(model.apply)(params["backbone"], full, batch),
        rtol=2e-5, atol=1e-6,
    )


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
    grads = jax.grad(lambda p: low.apply(p, batch).sum())(params)
    dec = grads["generator"]["params"]["decoder_dense1__kernel"]
    assert float(jnp.abs(dec["u"]).sum()) > 0 and float(jnp.abs(dec["kernel"]).sum()) > 0
