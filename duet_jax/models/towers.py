"""Pieces SASRec and GRU4Rec share: the target tower and the dot-product head.

Head = ``Dense(D, tanh) -> Dense(D)`` on the user vector ``s``; logit = ``<head(s), t>``.
That head is what DUET generates (2 * (D*D + D) = 2,112 values for D = 32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duet_jax.models import layers

Array = jax.Array


def target_tower_init(rng: Array, dim: int) -> layers.Params:
    return layers.mlp_init(rng, (dim, dim, dim))


def target_tower(params: layers.Params, item_embedding: Array, target: Array) -> Array:
    """``t = Dense(D) ∘ tanh ∘ Dense(D) (E[target])`` -> ``[B, D]``."""
    return layers.mlp(params, layers.embed(item_embedding, target), (jnp.tanh, None))


def dot_head_init(rng: Array, dim: int) -> layers.Params:
    return layers.mlp_init(rng, (dim, dim, dim))


def dot_head_logits(head: layers.Params, features: dict[str, Array]) -> Array:
    """``<Dense(D)(tanh(Dense(D)(s))), t>`` -> ``[B]``; head shared or per example."""
    user = layers.mlp(head, features["user"], (jnp.tanh, None))
    return jnp.sum(user * features["target"], axis=-1)
