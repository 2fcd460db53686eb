"""DIN device model (Zhou et al. 2018), as the DUET authors configure it.

``t = Dense(D, tanh)(E[target])``; ``H = Dense(D, tanh)(E[seq])``; target attention
``a = softmax((Wq t)·(Wk H)ᵀ / sqrt(D), padding masked) (Wv H)``; head = MLP
``2D -> 128 -> 64 -> 1`` (tanh, tanh, none) on ``[t; a]``; logit = head output.
The head is 16,641 values for D = 32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duet_jax.models import layers
from duet_jax.models.config import ModelConfig

Array = jax.Array

DEFAULT = ModelConfig(num_items=1)


def init(rng: Array, config: ModelConfig) -> dict:
    d = config.embed_dim
    k_item, k_target, k_seq, k_att, k_head = jax.random.split(rng, 5)
    backbone = {
        "item_embedding": layers.embedding_init(k_item, config.num_items + 1, d),
        "target_proj": layers.dense_init(k_target, d, d),
        "input_proj": layers.dense_init(k_seq, d, d),
        "attention": layers.target_attention_init(k_att, d),
    }
    head = layers.mlp_init(k_head, (2 * d, *config.din_hidden, 1))
    return {"backbone": backbone, "head": head}


# the item table is read only as layers.embed at click_seq and target ids: all-parameter
# fine-tuning may carry the rows a device reads alone (models/__init__.py)
ITEM_TABLES = ("item_embedding",)

# embed_sequence's features depend on each item alone (not its position, nor the
# sequence's length): Duet.prepare may compute them once per item (models/__init__.py)
PER_ITEM_FEATURES = True


def embed_sequence(backbone: dict, seq: Array) -> tuple[Array, Array]:
    """``H = tanh(Dense(E[seq]))`` -> ``([B, L, D], mask [B, L])``."""
    x = layers.embed(backbone["item_embedding"], seq)
    return jnp.tanh(layers.dense(backbone["input_proj"], x)), layers.sequence_mask(seq)


def encode(backbone: dict, batch: dict, config: ModelConfig = DEFAULT) -> dict[str, Array]:
    """-> ``{"target": t [B, D], "interest": a [B, D]}``."""
    del config
    h, mask = embed_sequence(backbone, batch["click_seq"])
    t = jnp.tanh(
        layers.dense(
            backbone["target_proj"], layers.embed(backbone["item_embedding"], batch["target"])
        )
    )
    return {"target": t, "interest": layers.target_attention(backbone["attention"], t, h, mask)}


def head_logits(head: dict, features: dict[str, Array]) -> Array:
    """MLP on ``[t; a]`` -> ``[B]``; tanh after every layer but the last."""
    x = jnp.concatenate([features["target"], features["interest"]], axis=-1)
    activations = (jnp.tanh,) * (len(head) - 1) + (None,)
    return layers.mlp(head, x, activations)[..., 0]


def apply(backbone: dict, head: dict, batch: dict, config: ModelConfig = DEFAULT) -> Array:
    """-> logits ``[B]``. ``head`` is shared (template shapes) or per example (leading ``B``)."""
    return head_logits(head, encode(backbone, batch, config))
