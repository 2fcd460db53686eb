"""The opt-in fast encoders (``gru_bf16``, ``attention``): registered, off by default,
correct on padding, and ``gru_bf16`` within bfloat16 rounding of the float32 GRU with the
very same parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import encoders
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.generator import ParameterGenerator
from duet_jax.methods import DuetOptions
from duet_jax.models import ModelConfig, get_model
from experiments.configs import common


def test_fast_encoders_are_registered_and_off_by_default():
    assert {"gru", "gru_bf16", "attention"} <= set(encoders.encoder_names())
    assert DuetOptions().encoder == "gru"
    assert ParameterGenerator(spec={"w": jnp.zeros((2, 2))}).encoder == "gru"
    assert Duet.create(get_model("sasrec", ModelConfig(num_items=5))).generator.encoder == "gru"
    assert common.base_config().generator.encoder == "gru"  # configs copy the default
    assert DuetOptions().generator_kwargs()["encoder"] == "gru"
    with pytest.raises(ConfigError, match=r"config\.generator\.encoder"):
        DuetOptions(encoder="lstm")
    assert dataclasses.replace(DuetOptions(), encoder="attention").encoder == "attention"


def _inputs(rng, n=16, length=9, dim=8):
    x = rng.normal(size=(n, length, dim)).astype(np.float32)
    lengths = rng.integers(0, length + 1, n)
    lengths[0], lengths[1] = 0, length
    return x, np.arange(length) < lengths[:, None]


def _encode(kind, params, x, mask):
    enc = encoders.get_encoder(kind, 8, 6)
    return np.asarray(jax.jit(jax.vmap(lambda f, m: enc.apply(params, f, m)))(x, mask))


def test_gru_bf16_shares_parameters_and_stays_close_to_float32(rng):
    x, mask = _inputs(rng)
    params = encoders.get_encoder("gru", 8, 6).init(jax.random.key(0), x[0], mask[0])
    bf16 = encoders.get_encoder("gru_bf16", 8, 6).init(jax.random.key(0), x[0], mask[0])
    assert jax.tree.structure(params) == jax.tree.structure(bf16)  # checkpoints interchange
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16))
    want, got = _encode("gru", params, x, mask), _encode("gru_bf16", params, x, mask)
    assert got.dtype == np.float32
    # bfloat16 keeps 8 significant bits: unit roundoff 2^-8 ~ 0.004. Each of the 9 steps
    # rounds inputs, weights and products of dots over 8 + 8 terms (state and gates <= 1):
    # ~ a few 2^-8 per step, compounding over 9 steps to ~0.05 on the state; the float32
    # dense layers (weights <= 0.7, widths 8) carry that to z at about the same size. 0.1
    # absolute bounds it; the float32 GRU itself would agree to ~1e-6, so this only shows
    # the variant computes the same function at lower precision (a wrong gate is O(1) off).
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)
    assert np.abs(got - want).max() > 0  # it does run in lower precision


def test_attention_encoder_ignores_padding_and_handles_empty(rng):
    x, mask = _inputs(rng)
    enc = encoders.get_encoder("attention", 8, 6)
    params = enc.init(jax.random.key(1), x[0], mask[0])
    base = _encode("attention", params, x, mask)
    noisy = np.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape)).astype(np.float32)
    # padded rows get exactly zero weight, so the output is unchanged bit for bit
    np.testing.assert_array_equal(_encode("attention", params, noisy, mask), base)
    assert np.all(np.isfinite(base))
    # an empty sequence pools to zero: z is the dense layers' output at zero input
    zero = _encode("attention", params, np.zeros_like(x[:1]), np.zeros_like(mask[:1]))
    np.testing.assert_array_equal(base[0], zero[0])


def test_duet_with_attention_encoder_generates_heads():
    model = get_model("sasrec", ModelConfig(num_items=20, seq_len=5, embed_dim=8))
    duet = Duet.create(model, encoder="attention")
    params = duet.init(jax.random.key(0))
    seq = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], jnp.int32)
    heads = jax.jit(duet.generate)(params, seq)
    assert heads["dense1"]["kernel"].shape == (2, 8, 8)
    assert "query" in params["generator"]["params"]["encoder"]
