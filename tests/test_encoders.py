"""The generator's encoder registry."""

import jax
import jax.numpy as jnp
import pytest

from duet_jax import encoders
from duet_jax.generator import ParameterGenerator, generate, init_generator


def test_unknown_encoder_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown generator encoder 'nope'"):
        ParameterGenerator.for_head({"w": jnp.zeros((3, 2))}, encoder="nope")


def test_registered_encoder_is_used_and_decoders_do_not_change():
    import flax.linen as nn

    class MeanEncoder(nn.Module):
        hidden_dim: int
        z_dim: int

        @nn.compact
        def __call__(self, features, mask):
            w = mask[:, None].astype(features.dtype)
            mean = (features * w).sum(0) / jnp.maximum(w.sum(), 1.0)
            return nn.Dense(self.z_dim)(mean)

    encoders.register_encoder("test_mean", MeanEncoder)
    with pytest.raises(ValueError, match="already registered"):
        encoders.register_encoder("test_mean", lambda **kw: None)
    template = {"w": jnp.zeros((3, 2))}
    gen = ParameterGenerator.for_head(template, hidden_dim=4, z_dim=4, encoder="test_mean")
    gru = ParameterGenerator.for_head(template, hidden_dim=4, z_dim=4)
    params = init_generator(gen, jax.random.key(0), seq_len=5, feature_dim=6)
    assert set(params["params"]["encoder"]) == {"Dense_0"}
    assert "gru" in init_generator(gru, jax.random.key(0), 5, 6)["params"]["encoder"]
    mask = jnp.array([[True] * 3 + [False] * 2])
    feats = jax.random.normal(jax.random.key(1), (1, 5, 6))
    heads = generate(gen, params, feats, mask)
    # padded rows do not change the head
    changed = feats.at[0, 3:].set(100.0)
    assert jnp.array_equal(generate(gen, params, changed, mask)["w"], heads["w"])
    assert heads["w"].shape == (1, 3, 2)
