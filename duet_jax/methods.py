"""What each compared method trains and how it scores a batch.

- ``base``: the cloud model as is: backbone + one static head shared by every device.
- ``finetune``: Base, then each device fine-tunes a copy on its own recent labelled rows
  (:mod:`duet_jax.finetune`; trained by no optimiser of its own here).
- ``duet``: backbone + parameter generator; each sample's head is generated from its
  ``trigger_seq``. ``training="joint"`` trains both together, as the authors' code does;
  ``"two_stage"``, as the paper's figure draws it, starts from the trained Base backbone and
  trains the generator alone (L_ppg) with the backbone frozen.
- ``duet_<variant>``: DUET with one ablation switched.
- ``base_wide``: Base plus DUET's extra sequence encoder feeding a static head, as many
  parameters as DUET (:class:`duet_jax.controls.WideBase`): the control for model size.
- ``duet_shuffled``, ``duet_mean``: the trained ``duet`` scored at test time with another
  device's head, or with one population-average head (:mod:`duet_jax.controls`).

Every method is one :class:`MethodSpec` in :data:`REGISTRY` (:func:`register_method`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax import controls
from duet_jax import encoders as encoders_lib
from duet_jax.data.samples import SampleSet
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.generator import DECODER_INITS, DECODER_MODES, resolve_decoder_init
from duet_jax.models import DeviceModel
from duet_jax.stabiliser import SOFTMAX_OVER

TRAINING_MODES = ("joint", "two_stage")
KINDS = ("trained", "on_device", "test_time")


@dataclasses.dataclass(frozen=True)
class DuetOptions:
    """How a DUET method builds its generator and trains: the one place these options'
    defaults and rules live (experiment configs copy their defaults from here)."""

    decoders: str = "trained"  # trained (paper) | frozen (authors' code)
    # auto = glorot for trained decoders, fmod_normal (authors' code) for frozen ones
    decoder_init: str = "auto"
    hidden_dim: int = 32  # encoder GRU state (authors: D)
    z_dim: int = 32  # z, the decoders' input (authors: D)
    # stabiliser (SWA): M candidate decoders mixed by self-similarity; 0 = off; softmax over
    # "candidates" (paper) or "rows" (authors' code)
    stabiliser: int = 0
    stabiliser_softmax: str = "candidates"
    low_rank: int = 0  # k: generate a k x k core per matrix leaf; 0 = full rank
    # joint (authors' code) | two_stage (paper's figure: Base first, then the generator alone)
    training: str = "joint"
    # the generator's encoder, a name registered in duet_jax.encoders: gru (paper); opt-in
    # speed/accuracy trade-offs: gru_bf16 (GRU in bfloat16), attention (parallel pooling)
    encoder: str = "gru"

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.generator.{name}", getattr(self, name), expected)

        if self.decoders not in DECODER_MODES:
            fail("decoders", f"one of {list(DECODER_MODES)}")
        if self.decoder_init not in DECODER_INITS:
            fail("decoder_init", f"one of {list(DECODER_INITS)}")
        try:
            resolve_decoder_init(self.decoders, self.decoder_init)
        except ValueError as err:
            fail("decoder_init", str(err))
        for name, low in (("hidden_dim", 1), ("z_dim", 1), ("stabiliser", 0), ("low_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"an integer >= {low}")
        if self.stabiliser_softmax not in SOFTMAX_OVER:
            fail("stabiliser_softmax", f"one of {list(SOFTMAX_OVER)}")
        if self.training not in TRAINING_MODES:
            fail("training", f"one of {list(TRAINING_MODES)}")
        if self.encoder not in encoders_lib.encoder_names():
            fail("encoder", f"one of {list(encoders_lib.encoder_names())}")

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`duet_jax.duet.Duet.create` (all but ``training``)."""
        out = dataclasses.asdict(self)
        out.pop("training")
        return out


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One entry of the method registry: everything that defines a compared method.

    ``kind="trained"``: a :class:`Method` trained by :func:`duet_jax.training.train_and_evaluate`.
    ``kind="on_device"``: adapts the trained Base on every device at test time
    (:mod:`duet_jax.finetune`); it has no :class:`Method` of its own.
    ``generator``: for DUET variants, the generator options this variant overrides; a value
    ``"ablation.X"`` is read from the experiment config's ``config.ablation.X`` (the M or k
    under test). ``None`` = the method has no generator.
    ``build``: for a trained method that is neither Base nor DUET,
    ``build(model, name, **generator_options) -> Method``; ``generator_of`` names the DUET
    method whose resolved generator options it is built with (``base_wide``: ``"duet"``,
    whose size it matches).
    ``kind="test_time"``: scores the trained parameters of DUET method ``evaluates`` in
    another way, without training: ``score(duet, params, samples, *, reference, seed,
    batch_size) -> logits [N]`` (``reference`` = the cloud-train split); see
    :func:`score_at_test_time`.
    """

    name: str
    description: str
    kind: str = "trained"
    generator: dict[str, Any] | None = None
    build: Callable[..., Method] | None = None
    generator_of: str | None = None
    evaluates: str | None = None
    score: Callable[..., np.ndarray] | None = None

    def __post_init__(self):
        def fail(problem: str):
            raise ValueError(f"method {self.name!r}: {problem}")

        if self.kind not in KINDS:
            fail(f"kind={self.kind!r}, expected one of {KINDS}")
        if (self.kind == "test_time") != (self.evaluates is not None and self.score is not None):
            fail("kind 'test_time' needs evaluates and score, and only it takes them")
        if self.build is not None and (self.kind != "trained" or self.generator is not None):
            fail("build is for trained methods without a generator")
        if self.generator_of is not None and self.build is None:
            fail("generator_of needs build (the generator options go to it)")

    @property
    def uses_generator(self) -> bool:
        return self.generator is not None


REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method to the registry (``replace=True`` to redefine an existing name)."""
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"method {spec.name!r} is already registered (pass replace=True)")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    MethodSpec("base", "the cloud model: backbone + one static head for every device"),
    MethodSpec("finetune", "Base, then Adam steps on each device's recent labelled rows",
               kind="on_device"),
    MethodSpec("duet", "backbone + generator; the head is written from trigger_seq", generator={}),
    MethodSpec("duet_frozen", "DUET with frozen random decoders (the authors' code)",
               generator={"decoders": "frozen", "decoder_init": "auto"}),
    MethodSpec("duet_stabiliser", "DUET with M candidate decoders mixed over candidates",
               generator={"stabiliser": "ablation.stabiliser",
                          "stabiliser_softmax": "candidates"}),
    MethodSpec("duet_stabiliser_rows", "DUET with the stabiliser's softmax over rows",
               generator={"stabiliser": "ablation.stabiliser", "stabiliser_softmax": "rows"}),
    MethodSpec("duet_two_stage", "Base first, then the generator alone (backbone frozen)",
               generator={"training": "two_stage"}),
    MethodSpec("duet_low_rank", "DUET generating a k x k core per matrix leaf",
               generator={"low_rank": "ablation.low_rank"}),
    MethodSpec("base_wide", "Base + DUET's sequence encoder into a static head, DUET's size",
               build=lambda model, name, **options: wide_method(model, name, **options),
               generator_of="duet"),
    MethodSpec("duet_shuffled", "trained DUET, each device scored with another's head",
               kind="test_time", evaluates="duet",
               score=lambda duet, params, samples, *, reference, seed, batch_size:
               controls.shuffled_logits(duet, params, samples, seed, batch_size)),
    MethodSpec("duet_mean", "trained DUET, every row scored with the mean-z head",
               kind="test_time", evaluates="duet",
               score=lambda duet, params, samples, *, reference, seed, batch_size:
               controls.mean_z_logits(duet, params, samples, reference, batch_size)),
):
    register_method(_spec)


def method_spec(name: str) -> MethodSpec:
    """The registry entry of ``name``; an unknown name raises :class:`ConfigError`."""
    if name not in REGISTRY:
        raise ConfigError("config.methods", name, f"a comma-separated subset of {list(REGISTRY)}")
    return REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(REGISTRY)


def duet_variants() -> dict[str, dict[str, Any]]:
    """``{name: generator overrides}`` of every registered method with a generator."""
    return {n: dict(s.generator) for n, s in REGISTRY.items() if s.uses_generator}


# Read-only views of the built-in registry, for callers that list names.
DUET_VARIANTS: dict[str, dict[str, Any]] = duet_variants()
METHODS = method_names()


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


def wide_method(model: DeviceModel, name: str = "base_wide", **generator_options) -> Method:
    """``base_wide`` (:class:`duet_jax.controls.WideBase`) sized to match DUET with
    ``generator_options`` (:meth:`duet_jax.duet.Duet.create`'s keywords)."""
    wide = controls.WideBase.create(model, **generator_options)
    return Method(name=name, init=wide.init, logits=wide.apply)


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
    """The trainable :class:`Method` of registered method ``name`` (generator options
    already resolved, as :meth:`duet_jax.duet.Duet.create` takes them: for DUET, and for a
    method with ``generator_of``, that method's options). The one place a method is built;
    an ``on_device`` method (``finetune``) or a ``test_time`` one has no Method and is
    refused."""
    spec = method_spec(name)
    if spec.kind == "on_device":
        raise ValueError(f"method {name!r} adapts on each device and has no trained Method")
    if spec.kind == "test_time":
        raise ValueError(f"method {name!r} scores trained {spec.evaluates!r} at test time and "
                         "has no trained Method: use score_at_test_time")
    if spec.build is not None:
        return spec.build(model, name, **generator_options)
    if not spec.uses_generator:
        return base_method(model)
    duet = Duet.create(model, **generator_options)
    return duet_method(duet, name, training, base_params)


def score_at_test_time(
    name: str,
    duet: Duet,
    params: dict,
    samples: SampleSet,
    *,
    reference: SampleSet,
    seed: int,
    batch_size: int,
) -> np.ndarray:
    """Logits ``[N]`` of test-time method ``name`` on ``samples``: the trained parameters
    ``params`` of its :attr:`MethodSpec.evaluates` method (whose :class:`Duet` is ``duet``)
    scored its way; ``reference`` is the cloud-train split (``duet_mean`` averages z over
    it), ``seed`` the experiment's (``duet_shuffled`` derives its derangement from it)."""
    spec = method_spec(name)
    if spec.kind != "test_time":
        raise ValueError(f"method {name!r} is {spec.kind!r}, not a test-time method")
    return spec.score(duet, params, samples, reference=reference, seed=seed,
                      batch_size=batch_size)
