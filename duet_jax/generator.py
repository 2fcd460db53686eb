"""The parameter generator (PPG / MetaGenerator): a Flax hypernetwork that writes a head.

For one device: a GRU reads the device's sequence features ``H [L, D]`` (the backbone's
embedded trigger sequence), its state at the last valid position goes through
``Dense(D, tanh) -> Dense(Z)`` to give ``z [Z]``; then one decoder per head leaf writes that
leaf: ``leaf = reshape(z @ w_leaf + b_leaf, leaf.shape)`` (row-major). For a dense layer
``{kernel [in, out], bias [out]}`` this is exactly the authors' per-layer ``(w1, b1)`` and
``(w2, b2)``. The encoder is written for one device (``jax.vmap`` runs it across
devices); the decoders take ``z`` for one device or a batch ``[N, Z]``.

The head can be any pytree: build a generator with :meth:`ParameterGenerator.for_head`
from a template (arrays or ``jax.ShapeDtypeStruct`` leaves, e.g. a model's
``head_template()``); :class:`duet_jax.paramspec.HeadSpec` is the parsed form.

Options:
- ``decoders="trained"`` (default, the paper's intent) or ``"frozen"``: the authors' code
  never registers the decoder tensors with the optimiser, so they keep their random init
  (a quirk of that code, kept as an ablation); frozen decoders here get a zero gradient
  (``stop_gradient``), so the optimiser never moves them.
- ``decoder_init="glorot"``: a matrix leaf ``[..., in, out]`` starts with Glorot variance
  when ``z`` has unit variance (decoder weight variance ``2 / ((in + out) Z)``), and
  vector/scalar leaves (biases) start at zero, like the static head. ``"fmod_normal"``:
  every decoder tensor is ``fmod(N(0, 1), 2)``, the authors' init. ``"auto"`` (default):
  glorot for trained decoders, fmod_normal for frozen ones (the authors' pairing). Frozen
  glorot decoders are refused: their bias leaves would stay exactly zero for ever.
- ``stabiliser=M`` (0 = off): every decoder writes M candidates that
  :func:`duet_jax.stabiliser.stabilise` mixes by self-similarity (SWA / MetaStabilizer);
  ``stabiliser_softmax`` picks the paper's softmax over candidates or the authors' over rows.
- ``low_rank=k`` (0 = full rank): a matrix leaf ``[in, out]`` with ``k < min(in, out)`` is
  written as a :class:`duet_jax.lowrank.LowRankKernel`: the decoder generates a ``[k, k]``
  core per device, and ``U [in, k]``, ``V [k, out]`` are shared decoder parameters (trained
  or frozen with the other decoder tensors; ``N(0, 1/k)`` at init, so ``U C V`` has the
  core's variance: glorot scale). The device
  model applies it without forming the ``[in, out]`` weight; :func:`duet_jax.lowrank.materialize`
  forms it. Other leaves (vectors, thin matrices) stay full.
- ``encoder="gru"``: which registered encoder (:mod:`duet_jax.encoders`) turns the device's
  rows into ``z``; the decoders do not depend on it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from duet_jax import encoders as encoders_lib
from duet_jax import stabiliser as stabiliser_lib
from duet_jax.encoders import SequenceEncoder  # noqa: F401  (re-exported: the default encoder)
from duet_jax.lowrank import LowRankKernel
from duet_jax.paramspec import HeadSpec, HeadTemplate

Array = jax.Array

DECODER_MODES = ("trained", "frozen")
DECODER_INITS = ("auto", "glorot", "fmod_normal")


def resolve_decoder_init(decoders: str, decoder_init: str) -> str:
    """The init scheme actually used; raises ValueError for unknown or unusable choices."""
    if decoders not in DECODER_MODES:
        raise ValueError(f"decoders={decoders!r}: expected one of {DECODER_MODES}")
    if decoder_init not in DECODER_INITS:
        raise ValueError(f"decoder_init={decoder_init!r}: expected one of {DECODER_INITS}")
    if decoder_init == "auto":
        return "glorot" if decoders == "trained" else "fmod_normal"
    if decoders == "frozen" and decoder_init == "glorot":
        raise ValueError(
            "decoder_init='glorot' with decoders='frozen': generated biases would stay zero for "
            "ever; use 'fmod_normal' or 'auto'"
        )
    return decoder_init


def _fmod_normal(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    return jnp.fmod(jax.random.normal(rng, shape, dtype), 2.0)


def _zeros(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    del rng
    return jnp.zeros(shape, dtype)


def _glorot_decoder(leaf_shape: tuple[int, ...]):
    def init(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        z_dim = shape[-2]  # kernel [Z, size] or, with candidates, [M, Z, size]
        fan_in, fan_out = leaf_shape[-2], leaf_shape[-1]
        std = math.sqrt(2.0 / ((fan_in + fan_out) * z_dim))
        return std * jax.random.normal(rng, shape, dtype)

    return init


# From this many devices in one call, the decoders fold their bias into the matmul (see
# :func:`affine`); below it, forming the [Z + 1, size] kernel costs more than it saves.
FOLD_BIAS_MIN_DEVICES = 64


def affine(z: Array, kernel: Array, bias: Array) -> Array:
    """``z @ kernel + bias`` for ``z [*devices, Z]``, ``kernel [Z, size]``, ``bias [size]``.

    With at least :data:`FOLD_BIAS_MIN_DEVICES` devices it runs as one matmul,
    ``[z, 1] @ [kernel; bias]``. Why: XLA-CPU runs the bias add as a second pass over the
    ``[devices, size]`` output; for DIN's 16,641-value head at 256 devices that pass made the
    decoders 1.4-1.9x slower (2 CPU cores). For a single device the extra copy of the kernel
    costs more than the pass (1.7x slower), so small calls keep the plain form. Both forms
    compute the same sum; only the float summation order differs. The threshold was measured
    on XLA-CPU, and counts the devices of the whole call (under ``sharded_generate``, all
    accelerators' rows together).
    """
    devices = math.prod(z.shape[:-1])
    # a symbolic device count (jax.export with a batch dimension 'b') cannot be compared:
    # the plain form is right for any count
    if not isinstance(devices, int) or devices < FOLD_BIAS_MIN_DEVICES:
        return z @ kernel + bias
    ones = jnp.ones((*z.shape[:-1], 1), z.dtype)
    return jnp.concatenate([z, ones], -1) @ jnp.concatenate([kernel, bias[None]], 0)


def low_rank_for(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a leaf of ``shape`` is generated low-rank at ``rank`` (0 = never)."""
    return rank > 0 and len(shape) == 2 and rank < min(shape)


def _factor_init(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """``N(0, 1/k)`` for a low-rank factor ``U [in, k]`` or ``V [k, out]``."""
    rank = min(shape)
    return jax.random.normal(rng, shape, dtype) / math.sqrt(rank)


def _over_leading(fn: Any, ndim: int) -> Any:
    """``fn(x)`` for one device, mapped over the ``ndim`` leading (device) axes of ``x``."""
    for _ in range(ndim):
        fn = jax.vmap(fn)
    return fn


class LeafDecoder(nn.Module):
    """``z [*devices, Z]`` -> one head leaf ``[*devices, *shape]`` of ``dtype`` (or its
    low-rank form, with the core batched and ``U``, ``V`` shared).

    ``candidates = 0``: ``leaf = reshape(z @ kernel + bias)``. ``candidates = M``: M such
    decoders (kernel ``[M, Z, size]``) whose outputs the stabiliser mixes.
    """

    shape: tuple[int, ...]
    dtype: Any = jnp.float32
    trainable: bool = True
    init_scheme: str = "glorot"
    candidates: int = 0
    softmax_over: str = "candidates"
    rank: int = 0

    @nn.compact
    def __call__(self, z: Array) -> Array | LowRankKernel:
        low_rank = low_rank_for(self.shape, self.rank)
        generated = (self.rank, self.rank) if low_rank else self.shape
        size = math.prod(generated)
        if self.init_scheme == "fmod_normal":
            kernel_init, bias_init = _fmod_normal, _fmod_normal
        elif len(self.shape) >= 2:
            kernel_init, bias_init = _glorot_decoder(self.shape), _zeros
        else:
            kernel_init, bias_init = _zeros, _zeros
        lead = (self.candidates,) if self.candidates else ()
        kernel = self.param("kernel", kernel_init, (*lead, z.shape[-1], size))
        bias = self.param("bias", bias_init, (*lead, size))
        if low_rank:
            u = self.param("u", _factor_init, (self.shape[0], self.rank))
            v = self.param("v", _factor_init, (self.rank, self.shape[1]))
        if not self.trainable:
            kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
            if low_rank:
                u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        devices = z.shape[:-1]
        if self.candidates:
            # one [Z, M * size] matmul: a plain GEMM over devices
            flat = jnp.moveaxis(kernel, 0, 1).reshape(z.shape[-1], -1)
            out = affine(z, flat, bias.reshape(-1)).reshape(*devices, self.candidates, *generated)
            mix = functools.partial(stabiliser_lib.stabilise, softmax_over=self.softmax_over)
            out = _over_leading(mix, len(devices))(out)
        else:
            out = affine(z, kernel, bias).reshape(*devices, *generated)
        out = out.astype(self.dtype)
        return LowRankKernel(u=u, core=out, v=v) if low_rank else out


def decoder_name(path: str) -> str:
    """Flax submodule name of the decoder that writes the leaf at ``path`` (``/`` -> ``__``,
    since checkpoint key paths must not contain ``/``)."""
    return "decoder_" + path.replace("/", "__")


class ParameterGenerator(nn.Module):
    """Sequence features of one device -> a head with the template's structure and dtypes.

    ``__call__(seq_features [L, D], mask [L]) -> head`` for one device; ``encode`` (one
    device) and ``decode`` (one device or a batch) are the two stages. For many devices use
    :func:`generate`, which runs the decoders batched (vmapping ``apply`` instead would give
    the same heads without the bias fold of :func:`affine`).

    ``spec`` is a :class:`HeadSpec` or any head template pytree (converted on construction;
    every leaf must be a floating-point array or ``jax.ShapeDtypeStruct``).

    >>> template = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))}}
    >>> gen = ParameterGenerator.for_head(template, hidden_dim=8, z_dim=8)
    >>> params = init_generator(gen, jax.random.key(0), seq_len=5, feature_dim=4)
    >>> heads = generate(gen, params, jnp.ones((2, 5, 4)), jnp.ones((2, 5), bool))
    >>> heads["dense"]["kernel"].shape, heads["dense"]["bias"].shape
    ((2, 4, 3), (2, 3))
    """

    spec: HeadSpec | HeadTemplate
    hidden_dim: int = 32
    z_dim: int = 32
    decoders: str = "trained"
    decoder_init: str = "auto"
    stabiliser: int = 0  # M candidates per decoder; 0 = off
    stabiliser_softmax: str = "candidates"  # "candidates" (paper) | "rows" (authors' code)
    low_rank: int = 0  # k; 0 = full-rank decoders
    encoder: str = "gru"  # a name registered in duet_jax.encoders

    @classmethod
    def for_head(cls, template: HeadTemplate, **options: Any) -> ParameterGenerator:
        """A generator for heads shaped like ``template`` (a pytree of arrays or
        ``jax.ShapeDtypeStruct``); ``options`` are the other fields (``hidden_dim``, ...)."""
        return cls(spec=HeadSpec.from_template(template), **options)

    def __post_init__(self):
        # Before Flax's own post-init, which would freeze a dict template into a FrozenDict
        # (and lists into tuples) on the copies it makes, changing the heads' structure.
        spec = HeadSpec.of(self.spec)
        for path, dtype in zip(spec.paths, spec.dtypes, strict=True):
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"head template leaf {path!r} has dtype {dtype}: the generator writes "
                    "floating-point leaves only"
                )
        if self.encoder not in encoders_lib.encoder_names():
            raise ValueError(f"unknown generator encoder {self.encoder!r}: expected one of "
                             f"{list(encoders_lib.encoder_names())}")
        object.__setattr__(self, "spec", spec)
        super().__post_init__()

    def setup(self):
        init_scheme = resolve_decoder_init(self.decoders, self.decoder_init)
        self.encode_net = encoders_lib.get_encoder(
            self.encoder, self.hidden_dim, self.z_dim, name="encoder"
        )
        self.leaf_decoders = [
            LeafDecoder(
                shape=shape,
                dtype=dtype,
                trainable=self.decoders == "trained",
                init_scheme=init_scheme,
                candidates=self.stabiliser,
                softmax_over=self.stabiliser_softmax,
                rank=self.low_rank,
                name=decoder_name(path),
            )
            for path, shape, dtype in zip(
                self.spec.paths, self.spec.shapes, self.spec.dtypes, strict=True
            )
        ]

    def encode(self, seq_features: Array, mask: Array) -> Array:
        """-> ``z [Z]``."""
        return self.encode_net(seq_features, mask)

    def decode(self, z: Array) -> Any:
        """``z [*devices, Z]`` -> head pytree (template structure and dtypes, leaves
        ``[*devices, *shape]``; low-rank matrix leaves as :class:`LowRankKernel` with the core
        batched). Batched rather than vmapped, so :func:`affine` sees how many devices share
        the call."""
        return self.spec.unflatten_leaves([dec(z) for dec in self.leaf_decoders])

    def __call__(self, seq_features: Array, mask: Array) -> Any:
        return self.decode(self.encode(seq_features, mask))


def init_generator(generator: ParameterGenerator, rng: Array, seq_len: int, feature_dim: int):
    """Initialise generator parameters for ``[seq_len, feature_dim]`` sequence features.

    >>> gen = ParameterGenerator.for_head({"w": jnp.zeros((3, 2))}, hidden_dim=4, z_dim=4)
    >>> sorted(init_generator(gen, jax.random.key(0), seq_len=5, feature_dim=6)["params"])
    ['decoder_w', 'encoder']
    """
    features = jnp.zeros((seq_len, feature_dim), jnp.float32)
    mask = jnp.ones((seq_len,), bool)
    return generator.init(rng, features, mask)


def generate(generator: ParameterGenerator, params, seq_features: Array, mask: Array) -> Any:
    """Heads for many devices: ``[N, L, D]``, ``[N, L]`` -> head leaves with leading ``N``.

    Pure; wrap in ``jax.jit`` (``functools.partial(generate, generator)``). The encoder is
    vmapped over devices, the decoders run batched on ``z [N, Z]``. Low-rank leaves come back
    with a per-device core ``[N, k, k]`` and the shared ``U``, ``V`` once (not copied per
    device).

    >>> gen = ParameterGenerator.for_head({"w": jnp.zeros((3, 2))}, hidden_dim=4, z_dim=4)
    >>> params = init_generator(gen, jax.random.key(0), seq_len=5, feature_dim=6)
    >>> generate(gen, params, jnp.ones((7, 5, 6)), jnp.ones((7, 5), bool))["w"].shape
    (7, 3, 2)
    """
    encode = lambda f, m: generator.apply(params, f, m, method=ParameterGenerator.encode)
    z = jax.vmap(encode)(seq_features, mask)
    return generator.apply(params, z, method=ParameterGenerator.decode)
