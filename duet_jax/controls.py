"""Controls that could prove DUET's adaptation wrong: a parameter-matched static model, and
two test-time scorings of a trained DUET that break the link between a device and its head.

With ``sync_every=1`` DUET reads nothing Base does not (its trigger is the click sequence),
but it adds a second sequence encoder and a hypernetwork. If DUET beats Base, is that
because each device gets its own head, or because the model is bigger and reads the
sequence twice? Three controls separate the two:

- ``base_wide`` (trained, :class:`WideBase`): Base plus DUET's extra sequence encoder (the
  generator's GRU encoder over the backbone's embedding of ``trigger_seq`` -> ``z``), whose
  ``z`` feeds a *static* head: a static MLP ``z -> hidden (tanh) -> F`` adds its output to
  the backbone's features (all ``F`` floating values of a row, whatever the model) before
  the model's own static head. The hidden width is solved for so the parameter count
  matches DUET's (same model and generator options) within :data:`MATCH_TOLERANCE`. Same
  inputs, same encoder, as many parameters: only the per-sample head generation is missing.
- ``duet_shuffled`` (:func:`shuffled_logits`): every row of device ``u`` is scored with the
  head generated from the trigger of another device ``pi(u)`` of the same split
  (:func:`donor_rows` says which row). If DUET adapts, this hurts.
- ``duet_mean`` (:func:`mean_z_logits`): every row is scored with the one head decoded from
  the mean ``z`` over the cloud-train rows (:func:`mean_z` says why those). If DUET's gain
  survives this, the gain is a better static head, not adaptation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from duet_jax import encoders
from duet_jax import generator as gen_lib
from duet_jax.data.batching import batches
from duet_jax.data.samples import SampleSet
from duet_jax.duet import Duet
from duet_jax.models import DeviceModel, layers

Array = jax.Array

# base_wide's parameter count must be within this fraction of DUET's
MATCH_TOLERANCE = 0.1
# what the scorings feed a model (as duet_jax.training does): the rest of a batch is unread
MODEL_INPUTS = ("click_seq", "trigger_seq", "target", "label", "weight")
SHUFFLE_STREAM = 0x5EED  # the derangement's random stream, apart from the seed's other uses


def count_params(tree: Any) -> int:
    """Values in a pytree of arrays or ``jax.ShapeDtypeStruct`` (so ``jax.eval_shape`` output
    counts without allocating)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# base_wide: Base + DUET's sequence encoder into a static head


def _float_leaves(features: Any) -> list:
    return [x for x in jax.tree.leaves(features) if jnp.issubdtype(x.dtype, jnp.floating)]


def feature_size(model: DeviceModel) -> int:
    """``F``: floating values per row of ``model.encode``'s features (the z-MLP's output)."""
    seq_len = model.config.seq_len
    row = {
        "click_seq": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
        "trigger_seq": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
        "target": jax.ShapeDtypeStruct((1,), jnp.int32),
        "label": jax.ShapeDtypeStruct((1,), jnp.float32),
        "weight": jax.ShapeDtypeStruct((1,), jnp.float32),
    }
    backbone = jax.eval_shape(model.init, jax.random.key(0))["backbone"]
    features = jax.eval_shape(model.encode, backbone, row)
    return sum(math.prod(x.shape[1:]) for x in _float_leaves(features))


def add_to_features(features: Any, delta: Array) -> Any:
    """``features`` with ``delta [B, F]`` added: split in tree order over the floating leaves
    (each ``[B, ...]``, reshaped row-major); other leaves pass through."""
    leaves, treedef = jax.tree.flatten(features)
    out, start = [], 0
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(leaf)
            continue
        size = math.prod(leaf.shape[1:])
        part = delta[:, start : start + size].reshape(leaf.shape).astype(leaf.dtype)
        out.append(leaf + part)
        start += size
    if start != delta.shape[-1]:
        raise ValueError(f"delta has {delta.shape[-1]} values per row, features {start}")
    return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class WideBase:
    """Base with DUET's sequence encoder feeding its static head (``base_wide``).

    ``logits = head_logits(head, features + MLP(z))``, ``z = encoder(embed(trigger_seq))``,
    ``MLP = Dense(hidden, tanh) -> Dense(F)``. Parameters:
    ``{"backbone", "head", "encoder", "z_mlp"}``; the head has the template's shapes (one
    head for every sample). The MLP's output layer starts at zero and the backbone and head
    are drawn as Base draws them, so an initialised ``base_wide`` scores exactly as Base
    initialised from the same key; training decides how much the extra encoder is used.

    >>> from duet_jax.models import ModelConfig, get_model
    >>> wide = WideBase.create(get_model("gru4rec", ModelConfig(num_items=20, seq_len=4,
    ...                                                         embed_dim=8)))
    >>> seq = jnp.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    >>> batch = {"click_seq": seq, "trigger_seq": seq, "target": jnp.array([1, 2])}
    >>> wide.apply(wide.init(jax.random.key(0)), batch).shape
    (2,)
    """

    model: DeviceModel
    encoder: nn.Module  # DUET's generator encoder (same kind and sizes)
    hidden: int  # the z-MLP's hidden width
    features: int  # F: floating feature values per row (feature_size(model))

    @classmethod
    def create(cls, model: DeviceModel, hidden: int | None = None, **generator_options) -> WideBase:
        """``base_wide`` for ``model``, its encoder sized as DUET's with ``generator_options``
        (:meth:`duet_jax.duet.Duet.create`'s keywords) and ``hidden`` solved for (when None)
        so the parameter count matches that DUET's. Raises ValueError if no width does."""
        duet = Duet.create(model, **generator_options)
        encoder = encoders.get_encoder(duet.generator.encoder, duet.generator.hidden_dim,
                                       duet.generator.z_dim)
        f = feature_size(model)
        if hidden is not None:
            return cls(model, encoder, hidden, f)
        target = count_params(jax.eval_shape(duet.init, jax.random.key(0)))
        probe = cls(model, encoder, 1, f)
        fixed = count_params(jax.eval_shape(probe.init, jax.random.key(0))) - probe.mlp_params()
        # mlp_params = h (Z + 1 + F) + F: the width h that brings the total nearest DUET's
        width = max(1, round((target - fixed - f) / (encoder.z_dim + 1 + f)))
        wide = cls(model, encoder, width, f)
        total = fixed + wide.mlp_params()
        if abs(total - target) > MATCH_TOLERANCE * target:
            raise ValueError(
                f"base_wide for {model.name!r} with generator options {generator_options}: "
                f"its closest size ({total:,} parameters) is not within "
                f"{MATCH_TOLERANCE:.0%} of DUET's ({target:,})"
            )
        return wide

    def mlp_params(self) -> int:
        """Parameters of the z-MLP: ``hidden (Z + 1) + hidden F + F``."""
        return self.hidden * (self.encoder.z_dim + 1) + self.hidden * self.features + self.features

    def init(self, rng: Array) -> dict:
        """-> ``{"backbone", "head", "encoder", "z_mlp"}``."""
        # the backbone and head from rng as Base draws them: a seed's base_wide starts as
        # that seed's Base; the extra parameters from a key of their own
        params = self.model.init(rng)
        k_enc, k_mlp = jax.random.split(jax.random.fold_in(rng, 1))
        seq = jax.ShapeDtypeStruct((1, self.model.config.seq_len), jnp.int32)
        features, _ = jax.eval_shape(self.model.embed_sequence, params["backbone"], seq)
        one = (jnp.zeros(features.shape[1:], jnp.float32), jnp.ones(features.shape[1], bool))
        z_mlp = {
            "dense1": layers.dense_init(k_mlp, self.encoder.z_dim, self.hidden),
            # zero output layer: base_wide starts as Base (see the class docstring)
            "dense2": {"kernel": jnp.zeros((self.hidden, self.features), jnp.float32),
                       "bias": jnp.zeros((self.features,), jnp.float32)},
        }
        return {**params, "encoder": self.encoder.init(k_enc, *one), "z_mlp": z_mlp}

    def encode_trigger(self, params: dict, seq: Array) -> Array:
        """``seq [B, L]`` -> ``z [B, Z]``, as DUET's generator encodes a trigger."""
        features, mask = self.model.embed_sequence(params["backbone"], seq)
        encode = lambda f, m: self.encoder.apply(params["encoder"], f, m)
        return jax.vmap(encode)(features, mask)

    def apply(self, params: dict, batch: dict) -> Array:
        """-> logits ``[B]``: the static head on the features shifted by ``MLP(z)``."""
        features = self.model.encode(params["backbone"], batch)
        z = self.encode_trigger(params, batch["trigger_seq"])
        delta = layers.mlp(params["z_mlp"], z, (jnp.tanh, None))
        return self.model.head_logits(params["head"], add_to_features(features, delta))


def param_counts(model: DeviceModel, **generator_options) -> dict[str, int]:
    """``{"base", "duet", "base_wide"}``: parameter counts for ``model`` with DUET's
    ``generator_options`` (as :meth:`duet_jax.duet.Duet.create` takes them)."""
    key = jax.random.key(0)
    duet = Duet.create(model, **generator_options)
    wide = WideBase.create(model, **generator_options)
    return {
        "base": count_params(jax.eval_shape(model.init, key)),
        "duet": count_params(jax.eval_shape(duet.init, key)),
        "base_wide": count_params(jax.eval_shape(wide.init, key)),
    }


# ---------------------------------------------------------------------------------------------
# Test-time controls of a trained DUET


@functools.partial(jax.jit, static_argnums=0)
def _duet_logits(duet: Duet, params: dict, batch: dict) -> Array:
    return duet.apply(params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _static_logits(duet: Duet, backbone: Any, head: Any, batch: dict) -> Array:
    return duet.model.apply(backbone, head, batch)


@functools.partial(jax.jit, static_argnums=0)
def _z_sum(duet: Duet, params: dict, seq: Array, weight: Array) -> Array:
    """``sum_b weight_b z_b`` -> ``[Z]`` for ``seq [B, L]``."""
    return weight @ row_z(duet, params, seq)


@functools.partial(jax.jit, static_argnums=0)
def _decode(duet: Duet, params: dict, z: Array) -> Any:
    return duet.generator.apply(params["generator"], z, method=gen_lib.ParameterGenerator.decode)


def row_z(duet: Duet, params: dict, seq: Array) -> Array:
    """``seq [B, L]`` -> ``z [B, Z]``: the generator's encoding of each trigger."""
    features, mask = duet.model.embed_sequence(params["backbone"], seq)
    encode = lambda f, m: duet.generator.apply(
        params["generator"], f, m, method=gen_lib.ParameterGenerator.encode
    )
    return jax.vmap(encode)(features, mask)


def _predict(fn, samples: SampleSet, batch_size: int) -> np.ndarray:
    """``fn(batch) -> [B]`` over fixed-size padded batches -> ``[N]`` in storage order."""
    out = [
        np.asarray(fn({k: batch[k] for k in MODEL_INPUTS}))
        for batch in batches(samples, batch_size)
    ]
    return np.concatenate(out)[: len(samples)] if out else np.zeros(0, np.float32)


def device_derangement(devices: np.ndarray, seed: int) -> np.ndarray:
    """``pi``, aligned with ``devices`` (distinct ids): ``pi[i]`` is the donor of
    ``devices[i]``, never itself. One random cycle through all devices (a permutation with
    no fixed point), a pure function of ``(seed, devices)``. Fewer than 2 devices: ValueError.
    """
    n = len(devices)
    if n < 2:
        raise ValueError(
            f"duet_shuffled needs at least 2 devices in the split to give each device "
            f"another's trigger; this split has {n}"
        )
    order = np.random.default_rng([seed, SHUFFLE_STREAM]).permutation(n)
    pi = np.empty(n, np.int64)
    pi[order] = devices[np.roll(order, -1)]  # order[i] -> order[i + 1]: one n-cycle
    return pi


def donor_rows(user: np.ndarray, seed: int) -> np.ndarray:
    """``[N]`` row indices: whose trigger each row is scored with under ``duet_shuffled``.

    Devices are the distinct ``user`` ids of the split; device ``u`` gets donor
    ``v = pi(u)`` (:func:`device_derangement`). The ``k``-th row of ``u`` (in storage order,
    counting from 0) takes the ``(k mod n_v)``-th row of ``v``, ``n_v`` being ``v``'s row
    count. The samples store each device's rows chronologically, a positive followed by its
    negatives (which share its trigger), so when both devices have the same negatives per
    positive, the k-th prediction of ``u``'s period gets the trigger of ``v``'s k-th
    prediction (cycling through ``v``'s period when ``v`` has fewer): a trigger as far into
    the period as the row's own, so staleness and length match, only the device differs.
    """
    user = np.asarray(user)
    order = np.argsort(user, kind="stable")
    devices, starts, counts = np.unique(user[order], return_index=True, return_counts=True)
    pi = device_derangement(devices, seed)
    index = np.searchsorted(devices, user)  # each row's device, as an index into devices
    rank = np.empty(len(user), np.int64)
    rank[order] = np.arange(len(user)) - np.repeat(starts, counts)
    donor = np.searchsorted(devices, pi[index])
    return order[starts[donor] + rank % counts[donor]]


def shuffled_logits(
    duet: Duet, params: dict, samples: SampleSet, seed: int, batch_size: int
) -> np.ndarray:
    """``duet_shuffled``: logits ``[N]``, each row scored by the head generated from another
    device's trigger (:func:`donor_rows`); clicks and target are the row's own."""
    donors = donor_rows(samples.user, seed)
    shuffled = dataclasses.replace(samples, trigger_seq=samples.trigger_seq[donors])
    return _predict(functools.partial(_duet_logits, duet, params), shuffled, batch_size)


def mean_z(duet: Duet, params: dict, reference: SampleSet, batch_size: int) -> np.ndarray:
    """The mean of the generator's ``z`` over the rows of ``reference`` -> ``[Z]`` float32.

    ``duet_mean`` takes the cloud-train split as ``reference``: the population's ``z`` as
    the cloud knows it before the devices' period, i.e. the one generated head the cloud
    could ship to every device. The test split's own rows would leak that period's
    population drift into a control meant to have no device information. Each row counts
    once (as in the training loss), so active devices weigh more. Runs of consecutive rows
    with the same user and trigger (a positive and its negatives; positions sharing a sync)
    are encoded once and weighted by their length: the same mean, fewer encodings.
    """
    n = len(reference)
    if n == 0:
        raise ValueError("duet_mean: the reference split has no rows to average z over")
    seq, user = reference.trigger_seq, reference.user
    new = np.ones(n, bool)
    new[1:] = (user[1:] != user[:-1]) | np.any(seq[1:] != seq[:-1], axis=1)
    starts = np.flatnonzero(new)
    weight = np.diff(np.r_[starts, n]).astype(np.float32)
    total = np.zeros(duet.generator.z_dim, np.float64)
    for b in range(0, len(starts), batch_size):
        rows = starts[b : b + batch_size]
        pad = batch_size - len(rows)
        s = np.concatenate([seq[rows], np.zeros((pad, seq.shape[1]), seq.dtype)])
        w = np.concatenate([weight[b : b + batch_size], np.zeros(pad, np.float32)])
        total += np.asarray(_z_sum(duet, params, s, w), np.float64)
    return (total / n).astype(np.float32)


def mean_z_head(duet: Duet, params: dict, reference: SampleSet, batch_size: int) -> Any:
    """The one head ``duet_mean`` scores every row with: decoded from :func:`mean_z`
    (template shapes, no leading axis)."""
    return _decode(duet, params, jnp.asarray(mean_z(duet, params, reference, batch_size)))


def mean_z_logits(
    duet: Duet,
    params: dict,
    samples: SampleSet,
    reference_samples: SampleSet,
    batch_size: int,
) -> np.ndarray:
    """``duet_mean``: logits ``[N]``, every row scored by the one head :func:`mean_z_head`
    decodes from ``reference_samples`` (the cloud-train split); rows' triggers are unread."""
    head = mean_z_head(duet, params, reference_samples, batch_size)
    score = functools.partial(_static_logits, duet, params["backbone"], head)
    return _predict(score, samples, batch_size)
