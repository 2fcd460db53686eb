"""Generator encoders: what turns a device's recent data into ``z``, the decoders' input.

An encoder is a Flax module built as ``cls(hidden_dim=..., z_dim=...)`` and called for one
device: ``encoder(features [L, D], mask [L]) -> z [Z]`` (``mask`` marks the valid rows;
padded rows must not change ``z``). The generator picks one by name
(``ParameterGenerator(encoder="gru")``); the decoders and the head spec do not depend on it,
so any task whose device data can be embedded into ``[L, D]`` rows can use any encoder.

Built in: ``"gru"`` (the paper's: a GRU over the sequence, its state at the last valid
step, then ``Dense(hidden, tanh) -> Dense(Z)``); opt-in, for speed: ``"gru_bf16"`` (the
same GRU in bfloat16, same parameters) and ``"attention"`` (attention pooling, no
recurrence); for sets rather than sequences: ``"set"`` (permutation-invariant masked mean
plus attention pooling, used by the image task over a device's unlabelled images).
Register others with :func:`register_encoder`.

Token projections (:class:`TokenProjection`, :func:`token_projection`): an encoder whose
first step maps each row on its own (the GRU's input projections) can have that step
computed once per token of a vocabulary and gathered at generation time
(:meth:`duet_jax.duet.Duet.prepare`); ``"gru"`` and ``"gru_bf16"`` have one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from duet_jax.models import layers

Array = jax.Array


class SequenceEncoder(nn.Module):
    """GRU over ``H [L, D]`` (state at the last valid step) -> ``Dense(D, tanh) -> Dense(Z)``.

    ``dtype``: what the GRU computes in (parameters are stored float32 either way, so the
    same parameters serve both); ``"gru_bf16"`` registers the bfloat16 variant, an opt-in
    speed/accuracy trade-off. The two dense layers and ``z`` stay float32.
    """

    hidden_dim: int
    z_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, seq_features: Array, mask: Array) -> Array:
        gru_params = self.param(
            "gru", lambda rng: layers.gru_init(rng, seq_features.shape[-1], self.hidden_dim)
        )
        if self.dtype != jnp.float32:
            gru_params = jax.tree.map(lambda p: p.astype(self.dtype), gru_params)
            seq_features = seq_features.astype(self.dtype)
        last = layers.gru(gru_params, seq_features, mask).astype(jnp.float32)
        dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name)
        return dense(self.z_dim, "dense2")(jnp.tanh(dense(self.hidden_dim, "dense1")(last)))


@dataclasses.dataclass(frozen=True)
class TokenProjection:
    """An encoder split at its per-row first step, as pure functions of its parameters
    (the ``"encoder"`` entry of the generator's parameters):

    - ``project(params, rows [..., F]) -> projected`` (a tuple of ``[..., K]`` arrays): what
      the encoder's first step makes of each row on its own;
    - ``encode(params, projected, mask) -> z [*batch, Z]``: the rest, on the projected rows
      of the devices' sequences, time-major (each ``[L, *batch, K]``, ``mask [L, *batch]``),
      so a batch of devices runs without a transpose.

    For one device, ``encode(p, project(p, H), mask)`` equals the module's
    ``encoder(H, mask)`` up to float summation order.
    """

    project: Callable[[dict, Array], tuple[Array, ...]]
    encode: Callable[[dict, tuple[Array, ...], Array], Array]


def _cast(tree: Any, dtype: Any) -> Any:
    return tree if dtype == jnp.float32 else jax.tree.map(lambda p: p.astype(dtype), tree)


def _dense(params: dict, x: Array) -> Array:
    """``x @ kernel + bias``: what ``nn.Dense`` computes with these parameters."""
    return x @ params["kernel"] + params["bias"]


def _gru_projection(dtype: Any) -> TokenProjection:
    def project(params: dict, rows: Array) -> tuple[Array, ...]:
        return layers.gru_input_gates(_cast(params["gru"], dtype), rows.astype(dtype))

    def encode(params: dict, gates: tuple[Array, ...], mask: Array) -> Array:
        last = layers.gru_recurrence(_cast(params["gru"], dtype), gates, mask)
        hidden = jnp.tanh(_dense(params["dense1"], last.astype(jnp.float32)))
        return _dense(params["dense2"], hidden)

    return TokenProjection(project, encode)


class AttentionPoolEncoder(nn.Module):
    """A parallel (non-recurrent) encoder: attention pooling over ``H [L, D]``.

    ``k = tanh(H W_k)`` ``[L, hidden]``, ``w = softmax_valid(k q / sqrt(hidden))`` with a
    learned query ``q``, ``pooled = w H`` ``[D]``, then ``Dense(hidden, tanh) -> Dense(Z)``
    as the GRU encoder. No step depends on the previous one, so it runs as a few batched
    matmuls; it sees order only through what the features carry (e.g. SASRec's position
    embedding). Opt-in (``encoder="attention"``); an empty sequence gives ``pooled = 0``.
    """

    hidden_dim: int
    z_dim: int

    @nn.compact
    def __call__(self, seq_features: Array, mask: Array) -> Array:
        dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name)
        keys = jnp.tanh(dense(self.hidden_dim, "key")(seq_features))
        query = self.param("query", nn.initializers.normal(1.0), (self.hidden_dim,))
        scores = keys @ query / jnp.sqrt(jnp.float32(self.hidden_dim))
        weights = layers.masked_softmax(scores, mask)
        pooled = weights @ seq_features
        return dense(self.z_dim, "dense2")(jnp.tanh(dense(self.hidden_dim, "dense1")(pooled)))


EncoderFactory = Callable[..., nn.Module]

_ENCODERS: dict[str, EncoderFactory] = {
    "gru": SequenceEncoder,
    # opt-in trade-offs (docs/benchmark.md): same parameters as "gru", GRU in bfloat16
    "gru_bf16": functools.partial(SequenceEncoder, dtype=jnp.bfloat16),
    "attention": AttentionPoolEncoder,  # parallel, non-recurrent
}


_PROJECTIONS: dict[str, TokenProjection] = {
    "gru": _gru_projection(jnp.float32),
    "gru_bf16": _gru_projection(jnp.bfloat16),
}


def register_encoder(name: str, factory: EncoderFactory,
                     projection: TokenProjection | None = None) -> None:
    """Make ``factory(hidden_dim=, z_dim=)`` available as ``ParameterGenerator(encoder=name)``;
    ``projection``, if given, is its split at a per-row first step (:class:`TokenProjection`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if name in _ENCODERS and _ENCODERS[name] is not factory:
        raise ValueError(f"encoder {name!r} is already registered")
    _ENCODERS[name] = factory
    if projection is not None:
        _PROJECTIONS[name] = projection


def token_projection(kind: str) -> TokenProjection | None:
    """The :class:`TokenProjection` of encoder ``kind``, or None when it has none."""
    return _PROJECTIONS.get(kind)


def encoder_names() -> tuple[str, ...]:
    return tuple(sorted(_ENCODERS))


def get_encoder(kind: str, hidden_dim: int, z_dim: int, **kwargs) -> nn.Module:
    """The encoder registered as ``kind`` (``kwargs``, e.g. ``name``, go to the module);
    ValueError naming the known ones otherwise."""
    if kind not in _ENCODERS:
        raise ValueError(f"unknown generator encoder {kind!r}: expected one of "
                         f"{list(encoder_names())}")
    return _ENCODERS[kind](hidden_dim=hidden_dim, z_dim=z_dim, **kwargs)


class SetEncoder(nn.Module):
    """Permutation-invariant encoder of a *set* of rows ``[L, D]`` (e.g. the backbone features
    of a device's recent unlabelled images): ``phi = Dense(hidden, relu)`` per row, then a
    masked mean and a masked attention pooling (one learned score per row, softmax over the
    valid rows) of ``phi``, concatenated -> ``Dense(hidden, tanh) -> Dense(Z)``.

    Both pools are sums over rows weighted by the mask, so the order of the rows never
    matters and padded rows (``mask`` False) never change ``z``; an all-padded set gives the
    ``z`` of an all-zero pool.
    """

    hidden_dim: int
    z_dim: int

    @nn.compact
    def __call__(self, features: Array, mask: Array) -> Array:
        dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name)
        phi = jax.nn.relu(dense(self.hidden_dim, "phi")(features))  # [L, H]
        weight = mask.astype(phi.dtype)
        mean = (weight @ phi) / jnp.maximum(weight.sum(), 1.0)  # [H]
        scores = dense(1, "score")(phi)[:, 0]  # [L]
        attn = layers.masked_softmax(scores, mask) @ phi  # [H]
        pooled = jnp.concatenate([mean, attn])
        return dense(self.z_dim, "dense2")(jnp.tanh(dense(self.hidden_dim, "dense1")(pooled)))


register_encoder("set", SetEncoder)
