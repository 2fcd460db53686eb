"""Training with optax: jitted steps, validation each epoch, best-on-validation parameters,
test once at the end, and orbax checkpoints that make a killed run resume exactly.

A run's position is its step count alone: the batch order of epoch ``e`` is a pure function
of ``(seed, e)`` (:func:`duet_jax.data.batching.epoch_order`), the model has no dropout, and
the checkpoint holds parameters, optimiser state, the best parameters so far and the
validation history. So a run killed at any point and started again with the same command
replays the same batches from its last checkpoint and ends with the same parameters.

The same makes a run extensible: rerun with a larger ``num_epochs`` (or another
``patience``) in the same workdir and it goes on exactly as a run started with that budget
would have, as long as the run has not already trained past where the new budget stops.

Each epoch is also recorded in ``WORKDIR/metrics.jsonl`` and, with tensorboardX, in
TensorBoard files (:mod:`duet_jax.epoch_log`).

Safety: a run holds an ``fcntl`` lock on its workdir (a second process on the same workdir
stops with a message naming it); a damaged newest checkpoint falls back to the newest intact
one (:mod:`duet_jax.checkpoint`); and a run whose loss diverges stops after the epoch where it
does (:func:`divergence`) with a :class:`~duet_jax.errors.DivergenceError`, after moving its
files to ``WORKDIR/diverged-lr<rate>[-k]/`` so the same workdir accepts the same command with a
lower learning rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from duet_jax import cache, files, metrics
from duet_jax.checkpoint import Checkpointer
from duet_jax.data.batching import batches, epoch_order, num_batches, padded_batch
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.epoch_log import EpochLog
from duet_jax.errors import ConfigError, DivergenceError
from duet_jax.methods import Method

MODEL_INPUTS = ("click_seq", "trigger_seq", "target", "label", "weight")
RUN_CONFIG_FORMAT = 2  # run_config.json layout; older files are refused, not guessed at
# A run has diverged when an epoch's mean training loss, or the validation logloss, is more
# than this many times what it is measured against (divergence()). Healthy runs stay far
# below: a constant predictor's logloss is at most ln 2, and training only lowers the loss.
DIVERGENCE_FACTOR = 10.0
# what a diverged run's files are moved out of the way of a rerun
RUN_FILES = ("checkpoints", "checkpoints.corrupt", "run_config.json", "metrics.jsonl",
             "tensorboard")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-3
    batch_size: int = 1024
    eval_batch_size: int = 4096
    num_epochs: int = 10
    patience: int = 0  # stop after this many epochs without a better validation score; 0 = never
    select_metric: str = "auc"  # validation metric that picks the kept parameters
    checkpoint_every_steps: int = 200  # also saved at every epoch end
    progress: bool = True

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.train.{name}", getattr(self, name), expected)

        if not (
            isinstance(self.learning_rate, int | float)
            and self.learning_rate > 0
            and math.isfinite(self.learning_rate)
        ):
            fail("learning_rate", "a finite number > 0")
        for name in ("batch_size", "eval_batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        for name in ("patience", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        if self.select_metric not in metrics.METRIC_NAMES:
            fail("select_metric", f"one of {list(metrics.METRIC_NAMES)}")


# How each TrainConfig field bears on resuming a run in the same workdir (every field is in
# exactly one group):
# - identity: changes the trajectory of every step, so it must match the stored run;
# - budget: only decides when training stops, so it may change as long as the run has not
#   already trained past where the new value stops it;
# - cosmetic: changes no parameter. eval_batch_size only regroups the rows of a prediction,
#   and every model scores each row on its own, so metrics move by float rounding at most.
IDENTITY_FIELDS = ("learning_rate", "batch_size", "select_metric")
BUDGET_FIELDS = ("num_epochs", "patience")
COSMETIC_FIELDS = ("eval_batch_size", "checkpoint_every_steps", "progress")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    test: dict[str, float]  # test metrics of the kept (best-on-validation) parameters
    val: dict[str, float]  # validation metrics of the kept parameters
    best_epoch: int
    # one entry per epoch, as in metrics.jsonl: epoch, step, train_loss, val, seconds, best
    history: list[dict]
    params: Any  # the kept parameters
    steps: int
    train_seconds: float


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean BCE-with-logits over rows with weight > 0."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(logits_fn: Callable, optimizer: optax.GradientTransformation):
    def loss_fn(params, batch):
        return weighted_bce(logits_fn(params, batch), batch["label"], batch["weight"])

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), loss

    return train_step


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def predict(logits_fn: Callable, params: Any, samples: SampleSet, batch_size: int) -> np.ndarray:
    """Logits ``[N]`` for every sample, in storage order. ``logits_fn`` should be jitted."""
    out = [
        np.asarray(logits_fn(params, _model_inputs(batch)))
        for batch in batches(samples, batch_size)
    ]
    return np.concatenate(out)[: len(samples)] if out else np.zeros(0, np.float32)


def evaluate(
    logits_fn: Callable, params: Any, samples: SampleSet, batch_size: int, where: str = "eval"
) -> dict:
    """Metrics of ``params`` on ``samples``; non-finite logits raise FloatingPointError."""
    logits = predict(logits_fn, params, samples, batch_size)
    if not np.all(np.isfinite(logits)):
        bad = int(np.flatnonzero(~np.isfinite(logits))[0])
        raise FloatingPointError(
            f"{where}: logit of sample {bad} is {logits[bad]} ({int((~np.isfinite(logits)).sum())}"
            f" of {len(logits)} non-finite): training diverged; lower config.train.learning_rate"
        )
    return metrics.evaluate(samples.user, samples.label, logits)


# ---------------------------------------------------------------------------------------------
# What must match on resume


def workdir_identity(
    method: str, seed: int, data_fingerprint: str, config: TrainConfig, run_config: dict | None
) -> dict:
    """What a workdir's run is, as stored in ``run_config.json``.

    ``run_config`` holds the caller's fields that define the run, shaped like the experiment
    config (nested dicts of JSON-able values): they are stored under ``config`` and named
    ``config.<path>`` in errors. Its ``train`` entry is ignored: the identity fields of
    ``config`` (:data:`IDENTITY_FIELDS`) take its place.
    """
    caller = {k: v for k, v in (run_config or {}).items() if k != "train"}
    train = {k: getattr(config, k) for k in IDENTITY_FIELDS}
    identity = {
        "format": RUN_CONFIG_FORMAT,
        "method": method,
        "seed": seed,
        "data": data_fingerprint,
        "config": {**caller, "train": train},
    }
    return cache.canonical(identity)  # as stored: tuples -> lists, NaN -> null


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."  # digests: the start is enough


def identity_diff(saved: dict, current: dict) -> list[str]:
    """``["config.train.learning_rate: 0.001 -> 0.01", ...]``: each differing field, sorted
    (a field on one side only shows None on the other)."""
    return [
        f"{path}: {_show(old)} -> {_show(new)}"
        for path, old, new in cache.differences(saved, current)
    ]


def _check_run_config(workdir: str, identity: dict, defaults: dict | None = None) -> None:
    """Store ``identity`` in a fresh workdir; refuse a workdir whose run differs from it.

    ``defaults``: identity-shaped (``{"config": {...}}``) default settings; fields the stored
    identity lacks (added to the code after the run started) are taken from it first, so a
    run made before a field existed resumes when that field keeps its default."""
    path = os.path.join(workdir, "run_config.json")
    saved = cache.read_json(path)
    if saved is None:
        files.write_text_atomic(path, files.dumps(identity, sort_keys=True))
        return
    if defaults is not None:
        saved = cache.with_defaults(saved, cache.canonical(defaults))
    if saved.get("format") != RUN_CONFIG_FORMAT:
        raise ConfigError(
            "--workdir",
            workdir,
            f"a fresh directory: its run_config.json is in an older layout (format "
            f"{saved.get('format')!r}, now {RUN_CONFIG_FORMAT}) that cannot be compared",
        )
    diff = identity_diff(saved, identity)
    if diff:
        raise ConfigError(
            "--workdir",
            workdir,
            "a fresh directory, or the config its run was started with; these fields differ"
            f" (stored -> now): {'; '.join(diff)}",
        )


# ---------------------------------------------------------------------------------------------
# Divergence


def constant_logloss(rate: float, labels: np.ndarray) -> float:
    """Logloss ``[scalar]`` of predicting probability ``rate`` for every row of ``labels``."""
    rate = min(max(float(rate), 1e-7), 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * math.log(rate) + (1 - y) * math.log(1 - rate))) if y.size else 0.0


def divergence(history: list[dict], train_rate: float, val_labels: np.ndarray,
               factor: float = DIVERGENCE_FACTOR) -> str | None:
    """Why the run whose epochs are ``history`` has diverged, or None. Checked on the last
    epoch: its mean training loss is not finite, or more than ``factor`` times the first
    epoch's, or more than ``factor`` times a constant predictor's (the training positive rate
    ``train_rate``: the first epoch can diverge already); or its validation logloss is more
    than ``factor`` times that constant predictor's on ``val_labels``."""
    entry = history[-1]
    loss, first = entry["train_loss"], history[0]["train_loss"]
    constant_train = constant_logloss(train_rate, np.array([train_rate]))
    constant_val = constant_logloss(train_rate, val_labels)
    if loss is None or not math.isfinite(loss):
        return f"training loss {loss}"
    if len(history) > 1 and first is not None and loss > factor * first:
        return (f"mean training loss {loss:.4g} is over {factor:g}x the first epoch's "
                f"({first:.4g})")
    if loss > factor * constant_train:
        return (f"mean training loss {loss:.4g} is over {factor:g}x a constant predictor's "
                f"({constant_train:.4g})")
    val = entry["val"].get("logloss")
    if val is not None and (not math.isfinite(val) or val > factor * constant_val):
        return (f"validation logloss {val:.4g} is over {factor:g}x a constant predictor's "
                f"({constant_val:.4g})")
    return None


def _set_aside_diverged(workdir: str, learning_rate: float) -> str:
    """Move a diverged run's files to ``workdir/diverged-lr<rate>[-k]``; returns where."""
    base = os.path.join(workdir, f"diverged-lr{learning_rate:g}")
    target, k = base, 1
    while os.path.exists(target):
        k += 1
        target = f"{base}-{k}"
    os.makedirs(target)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.move(os.path.join(workdir, name), os.path.join(target, name))
    return target


# ---------------------------------------------------------------------------------------------
# When a run stops


def _improves(score: float, best: float | None) -> bool:
    return math.isfinite(score) and (best is None or score > best)


def _score(entry: dict, select_metric: str) -> float:
    value = entry["val"].get(select_metric)
    return -math.inf if value is None else metrics.selection_score(select_metric, value)


def _best_epochs(history: list[dict], select_metric: str) -> list[int]:
    """For each epoch ``e`` of ``history``, the best epoch among ``1..e`` (0: none yet)."""
    out, best, best_epoch = [], None, 0
    for entry in history:
        score = _score(entry, select_metric)
        if _improves(score, best):
            best, best_epoch = score, entry["epoch"]
        out.append(best_epoch)
    return out


def _stop_epoch(best_epochs: list[int], config: TrainConfig) -> int | None:
    """The epoch a run under ``config`` stops after, given its best epochs so far; None
    while it goes on."""
    for epoch, best in enumerate(best_epochs, 1):
        if epoch >= config.num_epochs or (config.patience and epoch - best >= config.patience):
            return epoch
    return None


def _check_budget(
    workdir: str, history: list[dict], step: int, steps_per_epoch: int, config: TrainConfig
) -> bool:
    """Whether the run restored at ``step`` is complete under ``config``'s budget. Refuses one
    that has trained past where a fresh run under ``config`` would have stopped: its kept
    parameters may come from an epoch that run never reaches."""
    best_epochs = _best_epochs(history, config.select_metric)
    stop = _stop_epoch(best_epochs, config)
    if stop is None:
        return False
    if step <= stop * steps_per_epoch:  # == : restored right at that epoch's end
        return True
    done, extra = divmod(step, steps_per_epoch)
    trained = f"{done} epochs" + (f" and {extra} steps of epoch {done + 1}" if extra else "")
    already = f"the run in {workdir!r} has already trained {trained}"
    if stop >= config.num_epochs:
        raise ConfigError(
            "config.train.num_epochs",
            config.num_epochs,
            f"at least {-(-step // steps_per_epoch)} (or a fresh --workdir): {already}",
        )
    # the smallest patience that stops after none of the epochs already passed
    needed = 1 + max(e - b for e, b in enumerate(best_epochs, 1) if e * steps_per_epoch < step)
    raise ConfigError(
        "config.train.patience",
        config.patience,
        f"0 or at least {needed} (or a fresh --workdir): with this patience the run would "
        f"have stopped after epoch {stop}, but {already}",
    )


# ---------------------------------------------------------------------------------------------
# The training loop


def train_and_evaluate(
    method: Method,
    data: Splits,
    config: TrainConfig,
    workdir: str,
    seed: int,
    run_config: dict | None = None,
    on_step: Callable[[int], None] | None = None,
    name: str | None = None,
    run_defaults: dict | None = None,
) -> TrainResult:
    """Train ``method`` on ``data.train``, select on ``data.val``, report ``data.test``.

    Checkpoints go to ``workdir/checkpoints``; an existing checkpoint is resumed. What
    defines the run (:func:`workdir_identity`: seed, method, a fingerprint of the data,
    ``config``'s :data:`IDENTITY_FIELDS` and the caller's ``run_config``) is stored in
    ``workdir`` and must match on resume; ``config``'s :data:`BUDGET_FIELDS` may change
    (see :func:`_check_budget`) and its :data:`COSMETIC_FIELDS` are free. ``on_step(step)`` is
    called after every optimiser step (logging, tests); ``name`` labels the progress bar
    (default: the method's name). ``run_defaults``: ``run_config``-shaped default settings
    that complete a stored identity written before a field existed (``_check_run_config``).

    Raises :class:`~duet_jax.errors.DivergenceError` when training diverges (the run's files
    are moved to ``workdir/diverged-lr<rate>``, module docstring) and
    :class:`~duet_jax.errors.RunError` when another process holds ``workdir``.
    """
    with files.workdir_lock(workdir):
        result, diverged = _train(method, data, config, workdir, seed, run_config, on_step,
                                  name, run_defaults)
        if diverged is None:
            return result
        moved = _set_aside_diverged(workdir, config.learning_rate)
    lr = config.learning_rate
    raise DivergenceError(
        lr,
        f"a smaller value (e.g. {lr / 10:g}): {diverged}. The diverged run's files were moved "
        f"to {moved}, so the same command with --config.train.learning_rate={lr / 10:g} (and "
        "the same --workdir) starts afresh",
    )


def _train(method, data, config, workdir, seed, run_config, on_step, name, run_defaults=None
           ) -> tuple[TrainResult | None, str | None]:
    """:func:`train_and_evaluate` inside the workdir lock: ``(result, None)``, or
    ``(None, why)`` when the run diverged (its files are left for the caller to move)."""
    identity = workdir_identity(method.name, seed, data.fingerprint(), config, run_config)
    _check_run_config(workdir, identity,
                      None if run_defaults is None else {"config": run_defaults})
    optimizer = optax.adam(config.learning_rate)
    # Copy so no two leaves share a buffer (the train step donates its input state).
    params = jax.tree.map(jnp.copy, method.init(jax.random.key(seed)))
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )
    best_params = jax.tree.map(jnp.copy, params)
    meta = {
        "history": [],
        "best_epoch": -1,
        "best_score": None,  # selection score of best_epoch (higher is better)
        "epoch_loss_sum": 0.0,
        "epoch_loss_count": 0,
        "train_seconds": 0.0,
        "epoch_start_seconds": 0.0,  # train_seconds when the current epoch began
    }

    steps_per_epoch = num_batches(len(data.train), config.batch_size)
    train_rate = float(np.mean(data.train.label)) if len(data.train) else 0.5
    diverged = None
    train_step = make_train_step(method.logits, optimizer)
    logits_fn = jax.jit(method.logits)
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpointer(os.path.join(workdir, "checkpoints")))
        if ckpt.latest_step() is not None:
            restored, saved = ckpt.restore({"train": state, "best_params": best_params})
            state, best_params = restored["train"], restored["best_params"]
            meta.update(saved)
        step = int(state.step)
        done = _check_budget(workdir, meta["history"], step, steps_per_epoch, config)
        log = stack.enter_context(EpochLog(workdir, meta["history"]))
        bar = stack.enter_context(
            tqdm(
                total=config.num_epochs * steps_per_epoch,
                initial=step,
                desc=name or method.name,
                unit="step",
                disable=not config.progress,
                dynamic_ncols=True,
                leave=True,
            )
        )
        started = time.perf_counter()
        seconds_before = meta["train_seconds"]

        def seconds() -> float:
            return seconds_before + time.perf_counter() - started

        pending_losses = []  # device scalars, read in order at checkpoints and epoch ends

        def flush_losses():
            for value in jax.device_get(pending_losses):
                meta["epoch_loss_sum"] += float(value)
                meta["epoch_loss_count"] += 1
            pending_losses.clear()

        def save():
            flush_losses()
            meta["train_seconds"] = seconds()
            ckpt.save(step, {"train": state, "best_params": best_params}, meta)

        while not done:
            epoch, first = divmod(step, steps_per_epoch)
            order = epoch_order(len(data.train), seed, epoch)
            for b in range(first, steps_per_epoch):
                index = order[b * config.batch_size : (b + 1) * config.batch_size]
                batch = _model_inputs(padded_batch(data.train, index, config.batch_size))
                state, loss = train_step(state, batch)
                step += 1
                pending_losses.append(loss)
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}", refresh=False)
                if on_step is not None:
                    on_step(step)
                every = config.checkpoint_every_steps
                if every and step % every == 0 and step % steps_per_epoch:
                    save()
            flush_losses()
            where = f"{name or method.name} validation after epoch {epoch + 1} (step {step})"
            try:
                val = evaluate(logits_fn, state.params, data.val, config.eval_batch_size, where)
            except FloatingPointError as err:
                diverged = f"{err}".replace("; lower config.train.learning_rate", "")
                break
            score = metrics.selection_score(config.select_metric, val[config.select_metric])
            best = _improves(score, meta["best_score"])
            if best:
                meta["best_score"], meta["best_epoch"] = score, epoch + 1
                best_params = jax.tree.map(jnp.copy, state.params)
            now = seconds()
            entry = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": meta["epoch_loss_sum"] / max(meta["epoch_loss_count"], 1),
                "val": val,
                "seconds": now - meta["epoch_start_seconds"],  # training and validation
                "best": best,  # best validation score so far
            }
            why = divergence([*meta["history"], entry], train_rate, data.val.label)
            if why is not None:
                diverged = f"{where}: training diverged: {why}"
                break
            meta["history"].append(entry)
            meta["epoch_loss_sum"], meta["epoch_loss_count"] = 0.0, 0
            meta["epoch_start_seconds"] = now
            best_epochs = _best_epochs(meta["history"], config.select_metric)
            done = _stop_epoch(best_epochs, config) is not None
            bar.set_postfix(
                epoch=epoch + 1,
                **{f"val_{config.select_metric}": f"{val[config.select_metric]:.4f}"},
            )
            save()
            log.append(entry)  # after the save: a logged epoch is one a resume keeps

    if diverged is not None:
        return None, diverged
    if meta["best_epoch"] < 1:
        raise RuntimeError(
            f"{method.name}: no epoch produced a finite validation {config.select_metric}; "
            "check the validation split has users with both labels"
        )
    test = evaluate(logits_fn, best_params, data.test, config.eval_batch_size, "test")
    return TrainResult(
        test=test,
        val=meta["history"][meta["best_epoch"] - 1]["val"],
        best_epoch=meta["best_epoch"],
        history=meta["history"],
        params=best_params,
        steps=step,
        train_seconds=meta["train_seconds"],
    ), None
