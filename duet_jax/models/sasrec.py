"""SASRec device model (Kang & McAuley 2018), as the DUET authors configure it.

``t = Dense(D) tanh Dense(D) (E[target])``; ``H = Dense(D, tanh)(E[seq] + P[pos])``;
one post-LN transformer encoder layer (``num_heads`` heads, FFN ``ffn_mult * D``, ReLU);
``s = H'[last valid position]``; head = ``Dense(D, tanh) -> Dense(D)`` on ``s``;
``logit = <head(s), t>``.

The authors' encoder uses no attention mask, so padded positions (zero item embedding plus
their position embedding) are attended to; ``ModelConfig.mask_padding=True`` masks them.
"""

from __future__ import annotations

import jax

from duet_jax.models import layers, towers
from duet_jax.models.config import ModelConfig

Array = jax.Array

DEFAULT = ModelConfig(num_items=1)  # static options used when apply() gets no config


def init(rng: Array, config: ModelConfig) -> dict:
    """-> ``{"backbone": ..., "head": ...}`` with xavier weights and zero biases."""
    d = config.embed_dim
    k_item, k_pos, k_target, k_in, k_enc, k_head = jax.random.split(rng, 6)
    backbone = {
        "item_embedding": layers.embedding_init(k_item, config.num_items + 1, d),
        "position_embedding": layers.xavier_uniform(k_pos, (config.seq_len, d)),
        "target_tower": towers.target_tower_init(k_target, d),
        "input_proj": layers.dense_init(k_in, d, d),
        "encoder": layers.transformer_layer_init(k_enc, d, config.ffn_mult * d),
    }
    return {"backbone": backbone, "head": towers.dot_head_init(k_head, d)}


def _check_length(seq: Array, positions: Array) -> None:
    if seq.shape[-1] != positions.shape[0]:
        raise ValueError(
            f"sequence length {seq.shape[-1]} != the model's seq_len {positions.shape[0]}: "
            "pad or cut sequences to seq_len"
        )


def _leading_positions(seq: Array, positions: Array) -> Array:
    """The position rows of ``seq``'s first positions: generation may cut a batch after its
    last valid position (``CUTS_TRAILING_PADDING``), never lengthen it."""
    if seq.shape[-1] > positions.shape[0]:
        _check_length(seq, positions)
    return positions[: seq.shape[-1]]


# embed_prepared of a batch cut after position k gives the first k positions' features:
# positions count from a sequence's oldest item, so cutting trailing padding keeps them
CUTS_TRAILING_PADDING = True

# the item table is read only as layers.embed at click_seq and target ids: all-parameter
# fine-tuning may carry the rows a device reads alone (models/__init__.py)
ITEM_TABLES = ("item_embedding",)


def embed_sequence(backbone: dict, seq: Array) -> tuple[Array, Array]:
    """``H = tanh(Dense(E[seq] + P))`` -> ``([B, L, D], mask [B, L])``; the generator reads it."""
    positions = backbone["position_embedding"]
    _check_length(seq, positions)
    x = layers.embed(backbone["item_embedding"], seq) + positions
    return jax.numpy.tanh(layers.dense(backbone["input_proj"], x)), layers.sequence_mask(seq)


def prepare_features(backbone: dict) -> dict[str, Array]:
    """What :func:`embed_sequence` computes once per parameter set: the input projection of
    every item ``[num_items + 1, D]`` (row 0: padding) and of every position, bias included,
    ``[L, D]`` (``Dense(E + P) = E W + (P W + b)``: linear, so it splits)."""
    proj = backbone["input_proj"]
    table = backbone["item_embedding"]
    items = layers.embed(table, jax.numpy.arange(table.shape[0])) @ proj["kernel"]
    return {"items": items, "positions": layers.dense(proj, backbone["position_embedding"])}


def embed_prepared(prepared: dict[str, Array], seq: Array) -> tuple[Array, Array]:
    """:func:`embed_sequence` from :func:`prepare_features`' tables: a gather and a ``tanh``
    (equal up to float summation order). ``seq`` may be cut after its last valid position
    (``L <= seq_len``)."""
    positions = _leading_positions(seq, prepared["positions"])
    return jax.numpy.tanh(prepared["items"][seq] + positions), layers.sequence_mask(seq)


def embed_prepared_time_major(prepared: dict[str, Array], seq: Array
                              ) -> tuple[Array, Array]:
    """:func:`embed_prepared` laid out time-major: ``seq [B, L]`` -> ``([L, B, D], mask
    [L, B])``, gathered in that order (no transpose of the features)."""
    positions = _leading_positions(seq, prepared["positions"])
    time_major = seq.T
    h = jax.numpy.tanh(prepared["items"][time_major] + positions[:, None, :])
    return h, layers.sequence_mask(time_major)


def encode(backbone: dict, batch: dict, config: ModelConfig = DEFAULT) -> dict[str, Array]:
    """-> ``{"user": s [B, D], "target": t [B, D]}``."""
    h, mask = embed_sequence(backbone, batch["click_seq"])
    key_mask = mask if config.mask_padding else None
    # Only H'[last valid] is used, so evaluate the encoder layer at that position alone.
    query = layers.last_valid(h, mask)[:, None, :]
    user = layers.transformer_layer(backbone["encoder"], query, h, config.num_heads, key_mask)
    return {
        "user": user[:, 0],
        "target": towers.target_tower(
            backbone["target_tower"], backbone["item_embedding"], batch["target"]
        ),
    }


head_logits = towers.dot_head_logits


def apply(backbone: dict, head: dict, batch: dict, config: ModelConfig = DEFAULT) -> Array:
    """-> logits ``[B]``. ``head`` is shared (template shapes) or per example (leading ``B``)."""
    return head_logits(head, encode(backbone, batch, config))
