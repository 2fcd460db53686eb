"""Sizes of a device model, shared by SASRec, GRU4Rec and DIN."""

from __future__ import annotations

import dataclasses

from duet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What ``init(rng, config)`` needs to build a device model.

    Defaults are the authors' (embedding size 32, sequence length 30, 4 attention heads,
    FFN 4D, DIN head 2D -> 128 -> 64 -> 1). A bad size raises :class:`ConfigError`.

    >>> ModelConfig(num_items=1000, embed_dim=16).num_heads
    4
    >>> ModelConfig(num_items=1000, embed_dim=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    duet_jax.errors.ConfigError: ModelConfig.num_heads=4 is invalid: expected a divisor of ...
    """

    num_items: int  # item ids are 1..num_items; 0 is padding
    seq_len: int = 30
    embed_dim: int = 32
    num_heads: int = 4  # SASRec
    ffn_mult: int = 4  # SASRec
    mask_padding: bool = False  # SASRec: the authors' encoder attends to padding; True masks it
    din_hidden: tuple[int, ...] = (128, 64)  # DIN head hidden sizes

    def __post_init__(self):
        checks = [
            ("num_items", self.num_items >= 1, "an integer >= 1"),
            ("seq_len", self.seq_len >= 1, "an integer >= 1"),
            ("embed_dim", self.embed_dim >= 1, "an integer >= 1"),
            ("num_heads", self.num_heads >= 1, "an integer >= 1"),
            ("ffn_mult", self.ffn_mult >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"ModelConfig.{name}", getattr(self, name), expected)
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                "ModelConfig.num_heads", self.num_heads, f"a divisor of embed_dim={self.embed_dim}"
            )
        if not self.din_hidden or any(h < 1 for h in self.din_hidden):
            raise ConfigError(
                "ModelConfig.din_hidden", self.din_hidden, "a non-empty tuple of sizes >= 1"
            )
