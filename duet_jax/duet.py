"""DUET: a device model whose head is written per sample by the parameter generator.

Parameters are ``{"backbone": ..., "generator": ...}``. For a batch, the backbone embeds
each sample's ``trigger_seq`` (the device's sequence at its last sync), the generator turns
that into one head per sample, and the device model applies it:
``logits = model.apply(backbone, heads, batch)``. Backbone and generator train jointly,
as the authors' code does.

Any device model works, built-in or registered with
:func:`duet_jax.models.register_model`; the generator is built from the model's head template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from duet_jax import encoders as encoders_lib
from duet_jax import generator as gen_lib
from duet_jax.models import DeviceModel
from duet_jax.paramspec import HeadSpec

Array = jax.Array

# Duet.prepare keeps an encoder's per-item tables separate (one gather each) up to this
# size, and stacks them into one table of [parts, H] rows (one gather of a contiguous row)
# above it. Measured on 2 cores of an AMD EPYC, GRU4Rec heads, B = 256, paired rounds: at
# 1,682 items (3 tables of 215 KB) separate tables generated 1.16x as fast as one stacked
# table; at 10,000 items (3 x 1.3 MB) the stacked table was 1.27x as fast (fewer cache and
# TLB misses on random rows). Either way the heads are the same numbers.
SEPARATE_TABLES_MAX_BYTES = 2 * 2**20

# Duet.generate_prepared encodes larger calls in chunks of this many devices. The encoder's
# intermediates take ~1 KB per device per step (gate inputs and states of 30 steps), so at
# 4,096 devices they no longer fit in cache: on 2 AMD EPYC cores SASRec generation ran at
# 69k devices/s at B = 4,096 against 126k at B = 256 (quiet machine, same run).
ENCODE_CHUNK = 256

# Duet.generate_prepared(by_length=True) cuts a chunk's sequences after a multiple of this
# many positions (or at seq_len): few enough static lengths to compile each once.
STEP_BUCKET = 8


def steps_needed(seq: Array) -> Array:
    """``seq [*batch, L]`` right-padded ids -> ``[*batch]`` int32: 1 + the position of each
    row's last valid (non-zero) id, 0 for an empty row: the leading positions it needs."""
    positions = jnp.arange(1, seq.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(seq != 0, positions, 0), axis=-1)


def step_buckets(length: int) -> tuple[int, ...]:
    """The lengths a sequence of ``length`` positions may be cut to: the multiples of
    :data:`STEP_BUCKET` below it, then ``length``."""
    return (*range(STEP_BUCKET, length, STEP_BUCKET), length)


@dataclasses.dataclass(frozen=True)
class Duet:
    """A device model plus a :class:`ParameterGenerator` for its head.

    Build it with :meth:`create`, or pass a generator made for the model's head template
    (``ParameterGenerator.for_head(model.head_template(), ...)``); a generator for another
    head structure is refused.

    >>> from duet_jax.models import ModelConfig, get_model
    >>> duet = Duet.create(get_model("gru4rec", ModelConfig(num_items=20, seq_len=4, embed_dim=8)))
    >>> params = duet.init(jax.random.key(0))
    >>> seq = jnp.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    >>> batch = {"click_seq": seq, "trigger_seq": seq, "target": jnp.array([1, 2])}
    >>> duet.apply(params, batch).shape
    (2,)
    """

    model: DeviceModel
    generator: gen_lib.ParameterGenerator

    def __post_init__(self):
        expected = HeadSpec.from_template(self.model.head_template())
        if self.generator.spec != expected:
            raise ValueError(
                f"the generator writes heads {self.generator.spec.paths} "
                f"{self.generator.spec.shapes}, but model {self.model.name!r} has head "
                f"{expected.paths} {expected.shapes}: build it with "
                "ParameterGenerator.for_head(model.head_template(), ...)"
            )

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
        encoder: str = "gru",
    ) -> Duet:
        """Generator for ``model``'s head; GRU and z sizes default to the embedding size D.
        ``stabiliser`` (M candidates, 0 = off) and ``low_rank`` (core size k, 0 = full) as
        :class:`duet_jax.generator.ParameterGenerator` documents."""
        d = model.config.embed_dim
        generator = gen_lib.ParameterGenerator(
            spec=model.head_template(),
            hidden_dim=hidden_dim or d,
            z_dim=z_dim or d,
            decoders=decoders,
            decoder_init=decoder_init,
            stabiliser=stabiliser,
            stabiliser_softmax=stabiliser_softmax,
            low_rank=low_rank,
            encoder=encoder,
        )
        gen_lib.resolve_decoder_init(decoders, decoder_init)  # fail here, not at first use
        return cls(model, generator)

    @property
    def spec(self) -> HeadSpec:
        return self.generator.spec

    def init(self, rng: Array) -> dict:
        """-> ``{"backbone": ..., "generator": ...}``; the backbone as the model inits it."""
        k_model, k_gen = jax.random.split(rng)
        backbone = self.model.init(k_model)["backbone"]
        seq_len = self.model.config.seq_len
        # the generator reads embed_sequence's features: take their width from it, not from
        # the config, so a registered model may embed into any size
        seq = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        features, _ = jax.eval_shape(self.model.embed_sequence, backbone, seq)
        gen_params = gen_lib.init_generator(
            self.generator, k_gen, seq_len, int(features.shape[-1])
        )
        return {"backbone": backbone, "generator": gen_params}

    def generate(self, params: dict, seq: Array) -> Any:
        """``seq [N, L]`` item ids -> heads with a leading ``N`` axis (one per device/sample)."""
        features, mask = self.model.embed_sequence(params["backbone"], seq)
        return gen_lib.generate(self.generator, params["generator"], features, mask)

    def prepare(self, params: dict) -> dict:
        """``params`` plus what generation can compute once per parameter set rather than
        once per device, for :meth:`generate_prepared` (serving, fleets, benchmarks):

        - ``"projected"``: when the model's sequence features depend on the item alone and
          the encoder has a per-row first step (``gru``, ``gru_bf16``), that step for every
          item: the GRU's input projections ``3 x [num_items + 1, H]``. A device's
          sequence is then a gather, the recurrence and the decoders (the backbone's input
          projection and the GRU's input projections leave the per-device work: about
          0.25 of SASRec-sized heads' 0.57 MFLOP per device).
        - ``"features"``: else the model's own split (SASRec: item and position parts of its
          input projection).

        The result is a pytree (pass it to ``jit``); recompute it whenever ``params``
        change. Heads equal :meth:`generate`'s up to float summation order.
        """
        features = self.model.prepare_features(params["backbone"])
        projection = encoders_lib.token_projection(self.generator.encoder)
        if features is not None and "tokens" in features and projection is not None:
            encoder = params["generator"]["params"]["encoder"]
            tables = tuple(projection.project(encoder, features["tokens"]))
            if (sum(t.size * t.dtype.itemsize for t in tables) > SEPARATE_TABLES_MAX_BYTES
                    and len({t.shape for t in tables}) == 1):
                tables = jnp.stack(tables, axis=-2)  # [num_items + 1, parts, H]: one row
            return {"params": params, "projected": tables}
        if features is not None:
            return {"params": params, "features": features}
        return {"params": params}

    def generate_prepared(self, prepared: dict, seq: Array, by_length: bool = True) -> Any:
        """:meth:`generate` from :meth:`prepare`'s output: ``seq [N, L]`` -> heads ``[N, ...]``.

        When ``N`` is a multiple of :data:`ENCODE_CHUNK` above it, the encoder runs chunk by
        chunk (``lax.map``) and the decoders once on all ``z [N, Z]``: the same numbers as
        one call, with the encoder's working set kept in cache.

        ``by_length`` (for models whose prepared features allow it,
        :attr:`~duet_jax.models.DeviceModel.cuts_trailing_padding`): each chunk is encoded
        cut after its longest sequence's last valid step, rounded up to a multiple of
        :data:`STEP_BUCKET` (a few static lengths; the chunk picks one at run time), and
        with several chunks the devices are first ordered by that length inside the call
        (``z`` is put back in the input's order), so short sequences share chunks. Padded
        positions never change ``z`` (the encoder contract), so the heads are the same
        numbers up to float summation order; the encoder's time follows the steps run.
        Leave it on; over a mesh of several devices, run it per accelerator
        (:func:`duet_jax.sharding.per_row`), so that ordering the rows never moves them
        between shards (under GSPMD partitioning it would)."""
        gen = self.generator
        if not (by_length and self.model.cuts_trailing_padding
                and ("projected" in prepared or "features" in prepared)):
            z = in_chunks(lambda s: self._encode_prepared(prepared, s), seq)
        else:
            z = in_length_order(lambda s: self._encode_cut(prepared, s), seq)
        return gen.apply(prepared["params"]["generator"], z, method=gen.decode)

    def _encode_cut(self, prepared: dict, seq: Array) -> Array:
        """:meth:`_encode_prepared` of ``seq [n, L]`` cut after the last position any row
        needs, rounded up to one of :func:`step_buckets` (``lax.switch``: one static shape
        per length, the branch chosen at run time)."""
        lengths = step_buckets(seq.shape[1])
        needed = jnp.max(steps_needed(seq))
        index = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), needed), len(lengths) - 1)
        return jax.lax.switch(index, [
            lambda k=k: self._encode_prepared(prepared, seq[:, :k]) for k in lengths])

    def _encode_prepared(self, prepared: dict, seq: Array) -> Array:
        """``seq [n, L]`` -> ``z [n, Z]`` from the prepared tables."""
        params = prepared["params"]
        gen = self.generator
        projection = encoders_lib.token_projection(gen.encoder)
        if "projected" in prepared:
            time_major = seq.T  # [L, n]: the recurrence steps over the leading axis
            tables = prepared["projected"]
            if isinstance(tables, tuple | list):
                gathered = tuple(table[time_major] for table in tables)
            else:  # stacked [num_items + 1, parts, H]: one gather, then the parts
                rows = tables[time_major]
                gathered = tuple(rows[..., k, :] for k in range(tables.shape[-2]))
            return projection.encode(params["generator"]["params"]["encoder"], gathered,
                                     time_major != 0)
        if "features" in prepared and projection is not None:
            # batched and gathered time-major rather than vmapped per device: the
            # per-device form transposes each device's rows inside the vmap, and ran 1.6x
            # slower (SASRec, B = 1,024, 2 AMD EPYC cores, paired rounds)
            features, mask = self.model.embed_prepared_time_major(prepared["features"], seq)
            encoder = params["generator"]["params"]["encoder"]
            return projection.encode(encoder, projection.project(encoder, features), mask)
        if "features" in prepared:
            features, mask = self.model.embed_prepared(prepared["features"], seq)
        else:
            features, mask = self.model.embed_sequence(params["backbone"], seq)
        encode = lambda f, m: gen.apply(params["generator"], f, m, method=gen.encode)
        return jax.vmap(encode)(features, mask)

    def apply(self, params: dict, batch: dict) -> Array:
        """-> logits ``[B]``, each sample scored by the head generated from its trigger_seq."""
        heads = self.generate(params, batch["trigger_seq"])
        return self.model.apply(params["backbone"], heads, batch)


def splits_into_chunks(n: Any, chunk: int) -> bool:
    """Whether :func:`in_chunks` runs ``n`` rows in chunks of ``chunk``: ``n`` a static
    multiple of ``chunk`` above it (a symbolic ``n``, ``jax.export``'s batch, never is)."""
    return isinstance(n, int) and n > chunk and n % chunk == 0


def in_chunks(fn: Callable[..., Any], *rows: Array, chunk: int | None = None) -> Any:
    """``fn(*rows)`` for arrays sharing a leading axis of ``n`` rows, computed ``chunk`` rows
    at a time (``lax.map``, default :data:`ENCODE_CHUNK`) when ``n`` is a static multiple of
    ``chunk`` above it, else in one call. ``fn`` must treat rows independently and return
    arrays (or a pytree of them) with the same leading ``n``: the results are the same
    numbers either way, with a smaller working set. A symbolic ``n`` (``jax.export``'s
    batch) cannot be compared, so it runs in one call."""
    n, chunk = rows[0].shape[0], chunk or ENCODE_CHUNK
    if not splits_into_chunks(n, chunk):
        return fn(*rows)
    split = tuple(r.reshape(n // chunk, chunk, *r.shape[1:]) for r in rows)
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)


def in_length_order(fn: Callable[..., Any], seq: Array, *rows: Array) -> Any:
    """:func:`in_chunks` of ``fn(seq, *rows)`` with the rows first ordered by
    :func:`steps_needed` (stable), the results put back in the input's order: chunks then
    hold sequences of similar length, so a ``fn`` that cuts each chunk after its longest
    sequence (:meth:`Duet.generate_prepared`) runs fewer steps. ``seq [n, L]``; ``rows`` share
    its leading axis; ``fn`` must treat rows independently. The same numbers as
    ``fn(seq, *rows)`` up to float summation order. Rows that make one chunk are not
    ordered: ``fn`` runs on them as they are."""
    if not splits_into_chunks(seq.shape[0], ENCODE_CHUNK):
        return fn(seq, *rows)
    order = jnp.argsort(steps_needed(seq), stable=True)
    out = in_chunks(fn, seq[order], *(r[order] for r in rows))
    return jax.tree.map(
        lambda x: jnp.zeros_like(x).at[order].set(x, unique_indices=True), out)
