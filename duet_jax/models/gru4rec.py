"""GRU4Rec device model (Hidasi et al. 2016), as the DUET authors configure it.

Like SASRec with a one-layer GRU (PyTorch gate/bias convention) in place of the transformer
and no position embedding: ``H = Dense(D, tanh)(E[seq])``; ``s = GRU(H)[last valid]``;
head = ``Dense(D, tanh) -> Dense(D)`` on ``s``; ``logit = <head(s), t>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duet_jax.models import layers, towers
from duet_jax.models.config import ModelConfig

Array = jax.Array

DEFAULT = ModelConfig(num_items=1)


def init(rng: Array, config: ModelConfig) -> dict:
    d = config.embed_dim
    k_item, k_target, k_in, k_gru, k_head = jax.random.split(rng, 5)
    backbone = {
        "item_embedding": layers.embedding_init(k_item, config.num_items + 1, d),
        "target_tower": towers.target_tower_init(k_target, d),
        "input_proj": layers.dense_init(k_in, d, d),
        "gru": layers.gru_init(k_gru, d, d),
    }
    return {"backbone": backbone, "head": towers.dot_head_init(k_head, d)}


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
    del config  # every size is in the parameter shapes
    h, mask = embed_sequence(backbone, batch["click_seq"])
    return {
        "user": layers.gru(backbone["gru"], h, mask),
        "target": towers.target_tower(
            backbone["target_tower"], backbone["item_embedding"], batch["target"]
        ),
    }


head_logits = towers.dot_head_logits


def apply(backbone: dict, head: dict, batch: dict, config: ModelConfig = DEFAULT) -> Array:
    """-> logits ``[B]``. ``head`` is shared (template shapes) or per example (leading ``B``)."""
    return head_logits(head, encode(backbone, batch, config))
