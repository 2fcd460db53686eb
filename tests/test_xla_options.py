"""``duet_jax.xla_options``: generation compiled with the CPU vector-width option gives the
heads of XLA's default compilation, and the option is set only where it means something."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import xla_options
from duet_jax.duet import Duet
from duet_jax.models import ModelConfig, get_model
from tests import tolerances as tol

D, L, ITEMS = 8, 7, 40
CONFIG = ModelConfig(num_items=ITEMS, seq_len=L, embed_dim=D, din_hidden=(8,))


def test_options_per_backend_and_width():
    assert xla_options.generation_options(backend="cpu") == {
        "xla_cpu_prefer_vector_width": xla_options.CPU_VECTOR_WIDTH}
    assert xla_options.generation_options(256, backend="cpu") == {
        "xla_cpu_prefer_vector_width": 256}
    assert xla_options.generation_options(0, backend="cpu") == {}  # XLA's default
    # accelerators: no CPU options, so their compilation (and cache keys) stay as they were
    assert xla_options.generation_options(backend="gpu") == {}
    assert xla_options.generation_options(backend="tpu") == {}
    with pytest.raises(ValueError, match=r"vector_width=300.*\(0, 128, 256, 512\)"):
        xla_options.generation_options(300)


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "din"])
def test_generation_with_the_option_equals_xla_default(model):
    duet = Duet.create(get_model(model, CONFIG))
    params = duet.init(jax.random.key(1))
    rng = np.random.default_rng(2)
    seq = rng.integers(0, ITEMS + 1, (96, L)).astype(np.int32)  # 0s: padding inside rows too
    prepared = duet.prepare(params)
    want = jax.jit(duet.generate_prepared)(prepared, jnp.asarray(seq))
    got = xla_options.generation_jit(duet.generate_prepared, 512)(prepared, jnp.asarray(seq))
    # Wider vectors may split the same sums into other partial sums: two float32 orders of
    # the generator's rounding path (embedding, one GRU step per position, two dense layers,
    # a decoder), each within gamma(n) of the exact value.
    atol = tol.f32_pair_atol(tol.generator_roundings(L, D, D, D, embed=(D + 2,)),
                             tol.MODEL_SCALE)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        tol.assert_within(a, b, atol, model)
    # and it is a real compilation option: XLA rejects a value of the wrong type
    with pytest.raises(Exception, match="xla_cpu_prefer_vector_width"):
        jax.jit(duet.generate_prepared,
                compiler_options={"xla_cpu_prefer_vector_width": "wide"})(prepared, seq)
