"""What each compared method trains and how it scores a batch.

- ``base``: the cloud model as is: backbone + one static head shared by every device.
- ``finetune``: Base, then each device fine-tunes a copy on its own recent labelled rows
  (:mod:`duet_jax.finetune`; trained by no optimiser of its own here).
- ``duet``: backbone + parameter generator; each sample's head is generated from its
  ``trigger_seq``. ``training="joint"`` trains both together, as the authors' code does;
  ``"two_stage"``, as the paper's figure draws it, starts from the trained Base backbone and
  trains the generator alone (L_ppg) with the backbone frozen.
- ``duet_<variant>``: DUET with one ablation switched (:data:`DUET_VARIANTS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.models import DeviceModel

TRAINING_MODES = ("joint", "two_stage")

# Ablations of DUET: generator/training overrides. A value ``"ablation.X"`` is read from the
# experiment config's ``config.ablation.X`` (the M and k under test).
DUET_VARIANTS: dict[str, dict[str, Any]] = {
    "duet": {},
    "duet_frozen": {"decoders": "frozen", "decoder_init": "auto"},
    "duet_stabiliser": {
        "stabiliser": "ablation.stabiliser",
        "stabiliser_softmax": "candidates",
    },
    "duet_stabiliser_rows": {"stabiliser": "ablation.stabiliser", "stabiliser_softmax": "rows"},
    "duet_two_stage": {"training": "two_stage"},
    "duet_low_rank": {"low_rank": "ablation.low_rank"},
}
METHODS = ("base", "finetune", *DUET_VARIANTS)


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


def duet_method(
    duet: Duet,
    name: str = "duet",
    training: str = "joint",
    base_params: dict | None = None,
) -> Method:
    """DUET trained jointly, or two-stage from ``base_params`` (backbone frozen: it gets no
    gradient, so Adam leaves it exactly as Base trained it)."""
    if training == "joint":
        return Method(name=name, init=duet.init, logits=duet.apply)
    if training != "two_stage":
        raise ConfigError("config.generator.training", training, f"one of {TRAINING_MODES}")
    if base_params is None:
        raise ValueError("two-stage DUET needs the trained Base parameters (base_params)")
    backbone = base_params["backbone"]

    def init(rng: jax.Array) -> dict:
        return {"backbone": jax.tree.map(jnp.copy, backbone),
                "generator": duet.init(rng)["generator"]}

    def logits(params: dict, batch: dict) -> jax.Array:
        frozen = {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}
        return duet.apply(frozen, batch)

    return Method(name=name, init=init, logits=logits)


def get_method(
    name: str,
    model: DeviceModel,
    training: str = "joint",
    base_params: dict | None = None,
    **generator_options,
) -> Method:
    """``base`` or a DUET variant (options already resolved); ``finetune`` has no Method."""
    if name == "base":
        return base_method(model)
    if name in DUET_VARIANTS:
        duet = Duet.create(model, **generator_options)
        return duet_method(duet, name, training, base_params)
    raise ConfigError("config.methods", name, f"a comma-separated subset of {list(METHODS)}")
