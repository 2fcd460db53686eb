"""duet_jax: device-cloud parameter generation (DUET / MetaNetwork) in JAX and Flax.

A parameter generator (a hypernetwork) reads a device's recent item sequence and writes that
device's model head; the backbone stays shared. The main entry points, importable from
here:

- device models: :func:`get_model` (``"sasrec"``, ``"gru4rec"``, ``"din"``, or your own
  added with :func:`register_model`), :class:`ModelConfig`, :class:`DeviceModel`;
- the generator: :class:`Duet` (a device model plus a generator for its head),
  :class:`ParameterGenerator` (for any head pytree), :func:`init_generator`,
  :func:`generate`, :class:`HeadSpec`;
- training: :class:`TrainConfig`, :func:`train_and_evaluate`;
- errors: :class:`ConfigError`, :class:`DataError`.

>>> import duet_jax, jax
>>> model = duet_jax.get_model("sasrec", duet_jax.ModelConfig(num_items=50, seq_len=6))
>>> duet = duet_jax.Duet.create(model)
>>> heads = duet.generate(duet.init(jax.random.key(0)), jax.numpy.ones((3, 6), int))
>>> heads["dense1"]["kernel"].shape  # one head per device
(3, 32, 32)

The names are imported on first use, so ``import duet_jax`` stays cheap (training pulls in
the checkpoint library) and submodules may import each other freely.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Duet": "duet_jax.duet",
    "ParameterGenerator": "duet_jax.generator",
    "generate": "duet_jax.generator",
    "init_generator": "duet_jax.generator",
    "HeadSpec": "duet_jax.paramspec",
    "DeviceModel": "duet_jax.models",
    "ModelConfig": "duet_jax.models",
    "get_model": "duet_jax.models",
    "register_model": "duet_jax.models",
    "TrainConfig": "duet_jax.training",
    "train_and_evaluate": "duet_jax.training",
    "ConfigError": "duet_jax.errors",
    "DataError": "duet_jax.errors",
}

__all__ = [  # the same names, spelled out so tools can read them without running this file
    "ConfigError",
    "DataError",
    "DeviceModel",
    "Duet",
    "HeadSpec",
    "ModelConfig",
    "ParameterGenerator",
    "TrainConfig",
    "generate",
    "get_model",
    "init_generator",
    "register_model",
    "train_and_evaluate",
]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from duet_jax.duet import Duet
    from duet_jax.errors import ConfigError, DataError
    from duet_jax.generator import ParameterGenerator, generate, init_generator
    from duet_jax.models import DeviceModel, ModelConfig, get_model, register_model
    from duet_jax.paramspec import HeadSpec
    from duet_jax.training import TrainConfig, train_and_evaluate


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'duet_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
