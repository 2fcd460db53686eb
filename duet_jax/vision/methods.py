"""Base, base_wide, DUET and on-device fine-tuning on an image fleet (:mod:`.data`).

Every trained method is a function ``logits(params, images [S, R, H, W, C], sets [S, K, H,
W, C], mask [S, K]) -> [S, R, classes]``: ``S`` devices, ``R`` query images each, and each
device's *set* of ``K`` recent unlabelled images (padding masked):

- ``base``: backbone plus one static head; ignores the set.
- ``duet``: backbone plus a :class:`~duet_jax.generator.ParameterGenerator` with the
  permutation-invariant ``"set"`` encoder; the set's backbone features give ``z``, the
  decoders write the device's head.
- ``base_wide``: the capacity control: Base plus the same set encoder, whose ``z`` is
  concatenated to every image's features and read by one static head whose hidden width is
  chosen so that the parameter count is within 10% of DUET's.

Training samples ``S`` devices per step and, per device, ``R`` labelled rows and a disjoint
set of ``K`` other cloud-period images (the same batches for every method); Adam on softmax
cross-entropy; the parameters of the best validation accuracy are kept.

On-device fine-tuning starts from Base and takes Adam steps per device (``vmap``) on that
device's labelled images, on the head (features computed once) or on all parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from duet_jax.encoders import SetEncoder
from duet_jax.errors import ConfigError
from duet_jax.generator import ParameterGenerator, generate, init_generator
from duet_jax.models import DeviceModel, layers

Array = jax.Array
LogitsFn = Callable[[Any, Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class VisionTrainConfig:
    """Training, fine-tuning and evaluation choices (``config.train`` of the vision job)."""

    steps: int = 800
    devices_per_step: int = 16
    rows_per_device: int = 24
    set_size: int = 16  # K: unlabelled images a generated head is written from
    learning_rate: float = 3e-3
    eval_every: int = 100  # validation (and selection) every this many steps
    hidden_dim: int = 32  # set encoder width
    z_dim: int = 16
    finetune_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    finetune_steps: tuple[int, ...] = (5, 10, 25, 50)
    ece_bins: int = 15

    def __post_init__(self):
        for name in ("steps", "devices_per_step", "rows_per_device", "set_size", "eval_every",
                     "hidden_dim", "z_dim", "ece_bins"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"config.train.{name}", getattr(self, name), "an integer >= 1")
        if not self.learning_rate > 0:
            raise ConfigError("config.train.learning_rate", self.learning_rate, "a number > 0")
        if not self.finetune_lrs or any(lr <= 0 for lr in self.finetune_lrs):
            raise ConfigError("config.train.finetune_lrs", self.finetune_lrs,
                              "a non-empty tuple of learning rates > 0")
        if not self.finetune_steps or any(s < 1 for s in self.finetune_steps):
            raise ConfigError("config.train.finetune_steps", self.finetune_steps,
                              "a non-empty tuple of step counts >= 1")


# ------------------------------------------------------------------------- methods


def _features(model: DeviceModel, backbone, images: Array) -> Array:
    return model.impl.features(backbone, images)


def _per_device_heads(fn, heads, feats):
    """Each device's head on its own rows: heads leaves ``[S, ...]``, feats ``[S, R, F]``."""
    return jax.vmap(fn)(heads, feats)


@dataclasses.dataclass(frozen=True)
class Method:
    """A trained method: ``init(rng) -> params``, ``logits(params, images, sets, mask)``."""

    name: str
    init: Callable[[Array], Any]
    logits: LogitsFn


def base_method(model: DeviceModel) -> Method:
    def logits(params, images, sets, mask):
        del sets, mask
        return model.head_logits(params["head"], _features(model, params["backbone"], images))

    return Method("base", model.init, logits)


def duet_generator(model: DeviceModel, c: VisionTrainConfig) -> ParameterGenerator:
    """The generator for the model's head, reading sets of backbone features."""
    return ParameterGenerator.for_head(model.head_template(), hidden_dim=c.hidden_dim,
                                       z_dim=c.z_dim, encoder="set")


def duet_method(model: DeviceModel, c: VisionTrainConfig) -> Method:
    gen = duet_generator(model, c)
    feature_dim = model.impl.config.feature_dim

    def init(rng):
        k_model, k_gen = jax.random.split(rng)
        return {"backbone": model.init(k_model)["backbone"],
                "generator": init_generator(gen, k_gen, c.set_size, feature_dim)}

    def logits(params, images, sets, mask):
        heads = generate_heads(model, gen, params, sets, mask)
        return _per_device_heads(model.head_logits, heads,
                                 _features(model, params["backbone"], images))

    return Method("duet", init, logits)


def generate_heads(model: DeviceModel, gen: ParameterGenerator, params, sets: Array,
                   mask: Array):
    """Heads ``[S, ...]`` from each device's set ``[S, K, H, W, C]`` (mask ``[S, K]``)."""
    feats, mask = model.embed_sequence(params["backbone"], {"images": sets, "mask": mask})
    return generate(gen, params["generator"], feats, mask)


def encode_sets(model: DeviceModel, gen: ParameterGenerator, params, sets, mask) -> Array:
    """``z [S, Z]`` of each device's set."""
    feats, mask = model.embed_sequence(params["backbone"], {"images": sets, "mask": mask})
    one = lambda f, m: gen.apply(params["generator"], f, m, method=ParameterGenerator.encode)
    return jax.vmap(one)(feats, mask)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def wide_hidden(model: DeviceModel, c: VisionTrainConfig, target: int) -> int:
    """The static head's hidden width that brings base_wide's parameter count nearest
    ``target`` (DUET's)."""
    cfg = model.impl.config
    params = jax.eval_shape(model.init, jax.random.key(0))
    enc = jax.eval_shape(lambda: SetEncoder(c.hidden_dim, c.z_dim).init(
        jax.random.key(0), jnp.zeros((c.set_size, cfg.feature_dim)), jnp.ones(c.set_size, bool)))
    fixed = count(params["backbone"]) + count(enc) + cfg.num_classes
    per_hidden = cfg.feature_dim + c.z_dim + 1 + cfg.num_classes
    return max(1, round((target - fixed) / per_hidden))


def base_wide_method(model: DeviceModel, c: VisionTrainConfig, hidden: int) -> Method:
    cfg = model.impl.config
    encoder = SetEncoder(c.hidden_dim, c.z_dim)

    def init(rng):
        k_model, k_enc, k_head = jax.random.split(rng, 3)
        return {"backbone": model.init(k_model)["backbone"],
                "encoder": encoder.init(k_enc, jnp.zeros((c.set_size, cfg.feature_dim)),
                                        jnp.ones(c.set_size, bool)),
                "head": layers.mlp_init(k_head, (cfg.feature_dim + c.z_dim, hidden,
                                                 cfg.num_classes))}

    def logits(params, images, sets, mask):
        set_feats = _features(model, params["backbone"], sets)
        z = jax.vmap(lambda f, m: encoder.apply(params["encoder"], f, m))(set_feats, mask)
        feats = _features(model, params["backbone"], images)
        z = jnp.broadcast_to(z[:, None], (*feats.shape[:2], z.shape[-1]))
        return layers.mlp(params["head"], jnp.concatenate([feats, z], -1), (jax.nn.relu, None))

    return Method("base_wide", init, logits)


# ------------------------------------------------------------------------ training


def loss_fn(method: Method, params, images, labels, sets, mask) -> Array:
    logits = method.logits(params, images, sets, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sample_batches(rng: np.random.Generator, num_devices: int, per_device: int,
                   c: VisionTrainConfig) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``c.steps`` batches ``(devices [S], rows [S, R], set [S, K])`` of indices into the
    train split; rows and set are disjoint within a device."""
    if c.rows_per_device + c.set_size > per_device:
        raise ConfigError("config.train.rows_per_device", c.rows_per_device,
                          f"rows_per_device + set_size <= data.train_per_device = {per_device}")
    out = []
    s = min(c.devices_per_step, num_devices)
    for _ in range(c.steps):
        devices = rng.choice(num_devices, size=s, replace=False)
        perm = np.argsort(rng.random((s, per_device)), axis=1)
        out.append((devices, perm[:, :c.rows_per_device],
                    perm[:, c.rows_per_device:c.rows_per_device + c.set_size]))
    return out


def evaluate_logits(method: Method, params, images, sets, mask) -> np.ndarray:
    """``logits [D, n, C]`` for all devices at once (jitted)."""
    return np.asarray(_jit_logits(method.logits)(params, images, sets, mask))


@functools.lru_cache(maxsize=64)
def _jit_logits(fn):
    return jax.jit(fn)


def train(method: Method, rng: Array, train_images: Array, train_labels: Array,
          batches: list, c: VisionTrainConfig,
          validate: Callable[[Any], float]) -> tuple[Any, list[dict]]:
    """Adam on the batches; every ``eval_every`` steps (and at the end) ``validate(params)``
    -> validation accuracy; returns the best parameters (earliest on ties) and the history."""
    params = method.init(rng)
    opt = optax.adam(c.learning_rate)
    opt_state = opt.init(params)
    mask = jnp.ones((batches[0][2].shape[0], c.set_size), bool)

    @jax.jit
    def step(params, opt_state, devices, rows, set_idx):
        images = train_images[devices[:, None], rows]
        labels = train_labels[devices[:, None], rows]
        sets = train_images[devices[:, None], set_idx]
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(method, p, images, labels, sets, mask))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    best, best_acc, history = params, -1.0, []
    losses = []
    for i, (devices, rows, set_idx) in enumerate(batches, start=1):
        params, opt_state, loss = step(params, opt_state, devices, rows, set_idx)
        losses.append(loss)
        if i % c.eval_every == 0 or i == len(batches):
            acc = validate(params)
            history.append({"step": i, "train_loss": float(np.mean(jax.device_get(losses))),
                            "val_accuracy": acc})
            losses = []
            if acc > best_acc:
                best, best_acc = params, acc
    return best, history


# --------------------------------------------------------------------- fine-tuning


def finetune_curve(model: DeviceModel, base_params, mode: str, lr: float, max_steps: int,
                   tune_images: Array, tune_labels: Array, eval_images: Array) -> Array:
    """Per-device fine-tuning from Base: Adam at ``lr`` on each device's ``tune_images [D, n,
    ...]`` / labels, on the ``head`` or ``all`` parameters; returns the logits of
    ``eval_images [D, m, ...]`` after 1..max_steps steps, ``[max_steps, D, m, C]``."""
    if mode not in ("head", "all"):
        raise ConfigError("finetune mode", mode, "'head' or 'all'")
    run = _finetune_fn(model, mode, int(max_steps))
    return run(base_params, jnp.float32(lr), tune_images, tune_labels, eval_images)


@functools.lru_cache(maxsize=16)
def _finetune_fn(model: DeviceModel, mode: str, max_steps: int):
    """The jitted fine-tuning of :func:`finetune_curve` (the learning rate traced, so every
    rate of a grid shares one compilation)."""

    def one_device(base_params, lr, tune_x, tune_y, eval_x):
        opt = optax.adam(lr)
        if mode == "head":
            fixed = base_params["backbone"]
            tune_f, eval_f = _features(model, fixed, tune_x), _features(model, fixed, eval_x)
            trainable = base_params["head"]
            fwd = lambda p, which: model.head_logits(p, tune_f if which else eval_f)
        else:
            trainable = base_params
            fwd = lambda p, which: model.apply(p["backbone"], p["head"],
                                               {"image": tune_x if which else eval_x})

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(fwd(p, True), tune_y).mean()

        def body(carry, _):
            p, s = carry
            updates, s = opt.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), fwd(p, False)

        _, logits = jax.lax.scan(body, (trainable, opt.init(trainable)), None, length=max_steps)
        return logits

    batched = jax.vmap(one_device, in_axes=(None, None, 0, 0, 0))
    return jax.jit(lambda *args: jnp.moveaxis(batched(*args), 0, 1))
