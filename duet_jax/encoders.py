"""Generator encoders: what turns a device's recent data into ``z``, the decoders' input.

An encoder is a Flax module built as ``cls(hidden_dim=..., z_dim=...)`` and called for one
device: ``encoder(features [L, D], mask [L]) -> z [Z]`` (``mask`` marks the valid rows;
padded rows must not change ``z``). The generator picks one by name
(``ParameterGenerator(encoder="gru")``); the decoders and the head spec do not depend on it,
so any task whose device data can be embedded into ``[L, D]`` rows can use any encoder.

Built in: ``"gru"`` (the paper's: a GRU over the sequence, its state at the last valid
step, then ``Dense(hidden, tanh) -> Dense(Z)``). Register others with
:func:`register_encoder`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from duet_jax.models import layers

Array = jax.Array


class SequenceEncoder(nn.Module):
    """GRU over ``H [L, D]`` (state at the last valid step) -> ``Dense(D, tanh) -> Dense(Z)``."""

    hidden_dim: int
    z_dim: int

    @nn.compact
    def __call__(self, seq_features: Array, mask: Array) -> Array:
        gru_params = self.param(
            "gru", lambda rng: layers.gru_init(rng, seq_features.shape[-1], self.hidden_dim)
        )
        last = layers.gru(gru_params, seq_features, mask)
        dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name)
        return dense(self.z_dim, "dense2")(jnp.tanh(dense(self.hidden_dim, "dense1")(last)))


EncoderFactory = Callable[..., nn.Module]

_ENCODERS: dict[str, EncoderFactory] = {"gru": SequenceEncoder}


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Make ``factory(hidden_dim=, z_dim=)`` available as ``ParameterGenerator(encoder=name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if name in _ENCODERS and _ENCODERS[name] is not factory:
        raise ValueError(f"encoder {name!r} is already registered")
    _ENCODERS[name] = factory


def encoder_names() -> tuple[str, ...]:
    return tuple(sorted(_ENCODERS))


def get_encoder(kind: str, hidden_dim: int, z_dim: int, **kwargs) -> nn.Module:
    """The encoder registered as ``kind`` (``kwargs``, e.g. ``name``, go to the module);
    ValueError naming the known ones otherwise."""
    if kind not in _ENCODERS:
        raise ValueError(f"unknown generator encoder {kind!r}: expected one of "
                         f"{list(encoder_names())}")
    return _ENCODERS[kind](hidden_dim=hidden_dim, z_dim=z_dim, **kwargs)
