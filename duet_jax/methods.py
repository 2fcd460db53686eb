"""What each compared method trains and how it scores a batch.

- ``base``: the cloud model as is: backbone + one static head shared by every device.
- ``duet``: backbone + parameter generator; each sample's head is generated from its
  ``trigger_seq`` (trained jointly, as the authors' code does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.models import DeviceModel

METHODS = ("base", "duet")


@dataclasses.dataclass(frozen=True)
class Method:
    """``init(rng) -> params``; ``logits(params, batch) -> [B]``."""

    name: str
    init: Callable[[jax.Array], Any]
    logits: Callable[[Any, dict], jax.Array]


def base_method(model: DeviceModel) -> Method:
    return Method(
        name="base",
        init=model.init,
        logits=lambda params, batch: model.apply(params["backbone"], params["head"], batch),
    )


def duet_method(duet: Duet) -> Method:
    return Method(name="duet", init=duet.init, logits=duet.apply)


def get_method(name: str, model: DeviceModel, **generator_options) -> Method:
    """``base`` or ``duet``; ``generator_options`` go to :meth:`Duet.create`."""
    if name == "base":
        return base_method(model)
    if name == "duet":
        return duet_method(Duet.create(model, **generator_options))
    raise ConfigError("config.methods", name, f"a comma-separated subset of {list(METHODS)}")
