"""Device models as pure functions over parameter pytrees, and the registry that names them.

A device model is any module or object with these five functions (the protocol
:class:`ModelImpl` spells out; ``sasrec``, ``gru4rec`` and ``din`` are the built-in ones):

- ``init(rng, config) -> {"backbone": ..., "head": ...}``: parameter pytrees. The head's
  structure, shapes and dtypes are what a DUET generator writes (any pytree of float arrays).
- ``embed_sequence(backbone, seq [B, L]) -> (H [B, L, F], mask [B, L])``: what the
  generator reads (the embedded ``trigger_seq``).
- ``encode(backbone, batch, config) -> features``: the backbone's output for a batch (a
  pytree of ``[B, ...]`` arrays).
- ``head_logits(head, features) -> logits [B]``. The head is either shared (the template's
  shapes) or *per example* (every leaf with a leading ``B``: one generated head per
  sample); :func:`duet_jax.models.layers.dense` and ``mlp`` accept both.
- ``apply(backbone, head, batch, config) -> logits [B]``: ``head_logits(head, encode(...))``.

Optional, for faster generation (:meth:`duet_jax.duet.Duet.prepare`): either
``PER_ITEM_FEATURES = True`` when ``embed_sequence``'s feature of an item depends on the
item alone, not its position or the sequence's length (``gru4rec``, ``din``: the features of
every item are then ``embed_sequence`` of the sequence ``0, 1, ..., num_items``), or
``prepare_features(backbone) -> tables`` with
``embed_prepared(tables, seq) -> (H, mask)`` equal to ``embed_sequence`` (``sasrec``: its
input projection split into an item and a position part), optionally with
``embed_prepared_time_major(tables, seq) -> (H [L, B, F], mask [L, B])``.

Optional, for generation that skips trailing padding
(:meth:`duet_jax.duet.Duet.generate_prepared`): ``CUTS_TRAILING_PADDING = True`` when
``embed_prepared`` (and its time-major form) accepts a sequence shorter than ``seq_len`` and
then gives the first positions of the full sequence's features (``sasrec``: its position
embeddings are cut to match). Per-item features always allow it.

Optional, for faster all-parameter fine-tuning (:mod:`duet_jax.finetune`):
``ITEM_TABLES = ("item_embedding", ...)``, the backbone keys of per-item tables
``[num_items + 1, ...]`` that the model reads only as ``layers.embed(table, ids)`` of a
batch's ``click_seq`` and ``target``. A row no id of a device's rows names gets no gradient,
so Adam leaves it exactly as it was: fine-tuning may then carry only the rows a device
reads (its ids renumbered), which is the same computation on a far smaller table.

A batch is a dict: ``click_seq [B, L] int32`` right-padded with 0, ``target [B] int32``,
``label [B]``, ``user [B]`` (plus ``trigger_seq [B, L]`` for DUET). Sizes come from a
:class:`ModelConfig`.

Add a model with :func:`register_model`; :func:`get_model` binds a registered model to its
config as a :class:`DeviceModel`, which is what the rest of the library takes:

>>> import jax.numpy as jnp
>>> from duet_jax.models import layers
>>> class MeanPool:  # score = MLP(mean of the sequence's item embeddings * target's)
...     def init(self, rng, config):
...         k_items, k_head = jax.random.split(rng)
...         table = layers.embedding_init(k_items, config.num_items + 1, config.embed_dim)
...         head = layers.mlp_init(k_head, (config.embed_dim, 8, 1))
...         return {"backbone": {"items": table}, "head": head}
...     def embed_sequence(self, backbone, seq):
...         return layers.embed(backbone["items"], seq), layers.sequence_mask(seq)
...     def encode(self, backbone, batch, config):
...         h, mask = self.embed_sequence(backbone, batch["click_seq"])
...         pooled = h.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
...         return pooled * layers.embed(backbone["items"], batch["target"])
...     def head_logits(self, head, features):
...         return layers.mlp(head, features, (jnp.tanh, None))[..., 0]
...     def apply(self, backbone, head, batch, config):
...         return self.head_logits(head, self.encode(backbone, batch, config))
>>> register_model("mean_pool", MeanPool())
>>> model = get_model("mean_pool", ModelConfig(num_items=10, embed_dim=4))
>>> model.head_template()["dense1"]["kernel"]
ShapeDtypeStruct(shape=(4, 8), dtype=float32)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from collections.abc import Mapping
from typing import Any, Protocol

import jax

from duet_jax.errors import ConfigError
from duet_jax.models import din, gru4rec, sasrec
from duet_jax.models.config import ModelConfig

Array = jax.Array


class ModelImpl(Protocol):
    """What :func:`register_model` requires of a device model (see the module docstring)."""

    def init(self, rng: Array, config: ModelConfig) -> dict: ...

    def embed_sequence(self, backbone: Any, seq: Array) -> tuple[Array, Array]: ...

    def encode(self, backbone: Any, batch: dict, config: ModelConfig) -> Any: ...

    def head_logits(self, head: Any, features: Any) -> Array: ...

    def apply(self, backbone: Any, head: Any, batch: dict, config: ModelConfig) -> Array: ...


# The protocol's functions and the arguments each is called with.
PROTOCOL: dict[str, tuple[str, ...]] = {
    "init": ("rng", "config"),
    "embed_sequence": ("backbone", "seq"),
    "encode": ("backbone", "batch", "config"),
    "head_logits": ("head", "features"),
    "apply": ("backbone", "head", "batch", "config"),
}

BUILTIN: dict[str, types.ModuleType] = {"sasrec": sasrec, "gru4rec": gru4rec, "din": din}
_REGISTRY: dict[str, ModelImpl] = dict(BUILTIN)

# Read-only view of the registry (name -> model); add models with register_model.
MODELS: Mapping[str, ModelImpl] = types.MappingProxyType(_REGISTRY)
# built-in models that live in another task's package: name -> the module registering it
_BUILT_IN_ELSEWHERE = {"mobilenet": "duet_jax.vision"}


def _protocol_problems(impl: Any) -> list[str]:
    """What keeps ``impl`` from following the protocol (empty if nothing)."""
    problems = []
    for attr, args in PROTOCOL.items():
        fn = getattr(impl, attr, None)
        if fn is None or not callable(fn):
            problems.append(f"no callable {attr}({', '.join(args)})")
            continue
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # no introspectable signature: trust it
            continue
        try:
            signature.bind(*args)
        except TypeError:
            problems.append(f"{attr}{signature} cannot be called as {attr}({', '.join(args)})")
    return problems


def register_model(name: str, model: Any, *, replace: bool = False) -> None:
    """Make ``model`` (a module or object following the protocol) available as ``name`` to
    :func:`get_model` and to every config that names a model.

    Raises ValueError if ``name`` is not a non-empty string without whitespace or ``/``,
    if ``model`` lacks a protocol function or takes other arguments, or if ``name`` is
    taken by another model and ``replace`` is False. Registering the same model again is
    a no-op.

    >>> register_model("sasrec", gru4rec)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: register_model('sasrec'): the name is taken by the built-in model ...
    """
    if not isinstance(name, str) or not name or any(c.isspace() or c == "/" for c in name):
        raise ValueError(
            f"register_model({name!r}): the name must be a non-empty string without "
            "whitespace or '/'"
        )
    problems = _protocol_problems(model)
    if problems:
        hint = " (register an instance, not the class)" if isinstance(model, type) else ""
        raise ValueError(
            f"register_model({name!r}): {model!r} does not follow the device model protocol "
            f"(duet_jax.models.ModelImpl){hint}: {'; '.join(problems)}"
        )
    current = _REGISTRY.get(name)
    if current is not None and current is not model and not replace:
        kind = "the built-in model" if name in BUILTIN else "another model registered as"
        raise ValueError(
            f"register_model({name!r}): the name is taken by {kind} {name!r}; pass "
            "replace=True to replace it"
        )
    _REGISTRY[name] = model


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """A device model bound to its sizes: ``init(rng)``, ``apply(backbone, head, batch)``.

    ``impl`` is the registered model, looked up by ``name`` when not given (as
    :func:`get_model` does).

    >>> model = get_model("sasrec", ModelConfig(num_items=10, seq_len=5, embed_dim=8))
    >>> sorted(model.head_template())
    ['dense1', 'dense2']
    """

    name: str
    config: ModelConfig
    # hash=False: a registered object need not be hashable
    impl: ModelImpl = dataclasses.field(default=None, repr=False, hash=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.impl is None:
            if self.name not in _REGISTRY and self.name in _BUILT_IN_ELSEWHERE:
                # built-in models of other tasks register themselves on import
                importlib.import_module(_BUILT_IN_ELSEWHERE[self.name])
            if self.name not in _REGISTRY:
                raise ConfigError("config.model", self.name, f"one of {sorted(_REGISTRY)}")
            object.__setattr__(self, "impl", _REGISTRY[self.name])

    @property
    def module(self) -> ModelImpl:
        """The registered model (a module for the built-in ones)."""
        return self.impl

    def init(self, rng: Array) -> dict:
        """-> ``{"backbone": ..., "head": ...}``."""
        return self.impl.init(rng, self.config)

    def apply(self, backbone: Any, head: Any, batch: dict) -> Array:
        """-> logits ``[B]``; ``head`` shared or per example (leading ``B``)."""
        return self.impl.apply(backbone, head, batch, self.config)

    def encode(self, backbone: Any, batch: dict) -> Any:
        """The backbone's features of a batch (what the head reads)."""
        return self.impl.encode(backbone, batch, self.config)

    def head_logits(self, head: Any, features: Any) -> Array:
        """The head on backbone features -> logits ``[B]``."""
        return self.impl.head_logits(head, features)

    def embed_sequence(self, backbone: Any, seq: Array) -> tuple[Array, Array]:
        """``seq [B, L]`` -> ``(H [B, L, F], mask [B, L])``, what the generator reads."""
        return self.impl.embed_sequence(backbone, seq)

    def prepare_features(self, backbone: Any) -> dict | None:
        """What ``embed_sequence`` can compute once per parameter set (module docstring):
        ``{"tokens": [num_items + 1, F]}`` (per-item features), ``{"tables": ...}`` (the
        model's own split), or None when the model has neither."""
        if getattr(self.impl, "PER_ITEM_FEATURES", False):
            # every item (row 0: padding) as one sequence: embed_sequence's own computation
            items = jax.numpy.arange(self.config.num_items + 1)[None]
            return {"tokens": self.impl.embed_sequence(backbone, items)[0][0]}
        if callable(getattr(self.impl, "prepare_features", None)):
            return {"tables": self.impl.prepare_features(backbone)}
        return None

    def embed_prepared(self, prepared: dict, seq: Array) -> tuple[Array, Array]:
        """``embed_sequence`` from :meth:`prepare_features`' output (equal up to float
        summation order)."""
        if "tokens" in prepared:
            return prepared["tokens"][seq], seq != 0
        return self.impl.embed_prepared(prepared["tables"], seq)

    def embed_prepared_time_major(self, prepared: dict, seq: Array) -> tuple[Array, Array]:
        """:meth:`embed_prepared` time-major, ``([L, B, F], mask [L, B])``: the model's own
        ``embed_prepared_time_major`` if it has one (gathering in that order avoids a
        transpose), else a transpose of ``embed_prepared``."""
        if "tokens" in prepared:
            return prepared["tokens"][seq.T], seq.T != 0
        own = getattr(self.impl, "embed_prepared_time_major", None)
        if callable(own):
            return own(prepared["tables"], seq)
        features, mask = self.impl.embed_prepared(prepared["tables"], seq)
        return jax.numpy.swapaxes(features, 0, 1), mask.T

    @property
    def cuts_trailing_padding(self) -> bool:
        """Whether :meth:`embed_prepared` of a batch cut after position ``k`` (every row
        padding from there on) gives the first ``k`` positions of the whole batch's: true
        for per-item features, else declared by the model (``CUTS_TRAILING_PADDING``)."""
        return bool(getattr(self.impl, "PER_ITEM_FEATURES", False)
                    or getattr(self.impl, "CUTS_TRAILING_PADDING", False))

    @property
    def item_tables(self) -> tuple[str, ...]:
        """Backbone keys of per-item tables read only at a batch's item ids (the optional
        ``ITEM_TABLES``; empty when the model does not declare it)."""
        return tuple(getattr(self.impl, "ITEM_TABLES", ()))

    def head_template(self) -> Any:
        """The head's structure, shapes and dtypes (``jax.ShapeDtypeStruct`` leaves)."""
        return jax.eval_shape(self.init, jax.random.key(0))["head"]


def get_model(name: str, config: ModelConfig) -> DeviceModel:
    """The model registered as ``name`` bound to ``config``; an unknown name raises
    :class:`ConfigError` listing the registered ones.

    >>> model = get_model("din", ModelConfig(num_items=100, embed_dim=8, din_hidden=(16,)))
    >>> params = model.init(jax.random.key(0))
    >>> sorted(params["head"]), params["head"]["dense1"]["kernel"].shape
    (['dense1', 'dense2'], (16, 16))
    """
    return DeviceModel(name, config)


__all__ = [
    "MODELS",
    "DeviceModel",
    "ModelConfig",
    "ModelImpl",
    "din",
    "get_model",
    "gru4rec",
    "register_model",
    "sasrec",
]
