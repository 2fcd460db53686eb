"""DUET: a device model whose head is written per sample by the parameter generator.

Parameters are ``{"backbone": ..., "generator": ...}``. For a batch, the backbone embeds
each sample's ``trigger_seq`` (the device's sequence at its last sync), the generator turns
that into one head per sample, and the device model applies it:
``logits = model.apply(backbone, heads, batch)``. Backbone and generator train jointly,
as the authors' code does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from duet_jax import generator as gen_lib
from duet_jax.models import DeviceModel
from duet_jax.paramspec import HeadSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Duet:
    """A device model plus a :class:`ParameterGenerator` for its head."""

    model: DeviceModel
    generator: gen_lib.ParameterGenerator

    @classmethod
    def create(
        cls,
        model: DeviceModel,
        decoders: str = "trained",
        decoder_init: str = "auto",
        hidden_dim: int | None = None,
        z_dim: int | None = None,
        stabiliser: int = 0,
        stabiliser_softmax: str = "candidates",
        low_rank: int = 0,
    ) -> Duet:
        """Generator for ``model``'s head; GRU and z sizes default to the embedding size D.
        ``stabiliser`` (M candidates, 0 = off) and ``low_rank`` (core size k, 0 = full) as
        :class:`duet_jax.generator.ParameterGenerator` documents."""
        d = model.config.embed_dim
        generator = gen_lib.ParameterGenerator(
            spec=HeadSpec.from_template(model.head_template()),
            hidden_dim=hidden_dim or d,
            z_dim=z_dim or d,
            decoders=decoders,
            decoder_init=decoder_init,
            stabiliser=stabiliser,
            stabiliser_softmax=stabiliser_softmax,
            low_rank=low_rank,
        )
        gen_lib.resolve_decoder_init(decoders, decoder_init)  # fail here, not at first use
        return cls(model, generator)

    @property
    def spec(self) -> HeadSpec:
        return self.generator.spec

    def init(self, rng: Array) -> dict:
        k_model, k_gen = jax.random.split(rng)
        backbone = self.model.init(k_model)["backbone"]
        cfg = self.model.config
        gen_params = gen_lib.init_generator(self.generator, k_gen, cfg.seq_len, cfg.embed_dim)
        return {"backbone": backbone, "generator": gen_params}

    def generate(self, params: dict, seq: Array) -> Any:
        """``seq [N, L]`` item ids -> heads with a leading ``N`` axis (one per device/sample)."""
        features, mask = self.model.embed_sequence(params["backbone"], seq)
        return gen_lib.generate(self.generator, params["generator"], features, mask)

    def apply(self, params: dict, batch: dict) -> Array:
        """-> logits ``[B]``, each sample scored by the head generated from its trigger_seq."""
        heads = self.generate(params, batch["trigger_seq"])
        return self.model.apply(params["backbone"], heads, batch)
