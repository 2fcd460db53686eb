"""Device models as pure functions over parameter pytrees.

Each model module (``sasrec``, ``gru4rec``, ``din``) exposes
``init(rng, config) -> {"backbone", "head"}``, ``apply(backbone, head, batch) -> logits [B]``,
``embed_sequence(backbone, seq) -> (H [B, L, D], mask [B, L])`` (what the generator reads),
``encode`` and ``head_logits``. A batch is a dict: ``click_seq [B, L] int32`` right-padded
with 0, ``target [B] int32``, ``label [B]``, ``user [B]`` (plus ``trigger_seq [B, L]`` for DUET).

:class:`DeviceModel` binds a module to its :class:`ModelConfig` so callers need not pass
the config around.
"""

from __future__ import annotations

import dataclasses
import types

import jax

from duet_jax.errors import ConfigError
from duet_jax.models import din, gru4rec, sasrec
from duet_jax.models.config import ModelConfig

MODELS: dict[str, types.ModuleType] = {"sasrec": sasrec, "gru4rec": gru4rec, "din": din}


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """A device model bound to its sizes: ``init(rng)``, ``apply(backbone, head, batch)``."""

    name: str
    config: ModelConfig

    @property
    def module(self) -> types.ModuleType:
        return MODELS[self.name]

    def init(self, rng: jax.Array) -> dict:
        return self.module.init(rng, self.config)

    def apply(self, backbone: dict, head: dict, batch: dict) -> jax.Array:
        return self.module.apply(backbone, head, batch, self.config)

    def encode(self, backbone: dict, batch: dict) -> dict[str, jax.Array]:
        """The backbone's features of a batch (what the head reads)."""
        return self.module.encode(backbone, batch, self.config)

    def head_logits(self, head: dict, features: dict[str, jax.Array]) -> jax.Array:
        """The head on backbone features -> logits ``[B]``."""
        return self.module.head_logits(head, features)

    def embed_sequence(self, backbone: dict, seq: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.module.embed_sequence(backbone, seq)

    def head_template(self) -> dict:
        """The head's structure, shapes and dtypes (``jax.ShapeDtypeStruct`` leaves)."""
        return jax.eval_shape(self.init, jax.random.key(0))["head"]


def get_model(name: str, config: ModelConfig) -> DeviceModel:
    """Look up a device model by name; an unknown name raises :class:`ConfigError`."""
    if name not in MODELS:
        raise ConfigError("config.model", name, f"one of {sorted(MODELS)}")
    return DeviceModel(name, config)


__all__ = ["MODELS", "DeviceModel", "ModelConfig", "din", "get_model", "gru4rec", "sasrec"]
