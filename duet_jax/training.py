"""Training with optax: jitted steps, validation each epoch, best-on-validation parameters,
test once at the end, and orbax checkpoints that make a killed run resume exactly.

A run's position is its step count alone: the batch order of epoch ``e`` is a pure function
of ``(seed, e)`` (:func:`duet_jax.data.batching.epoch_order`), the model has no dropout, and
the checkpoint holds parameters, optimiser state, the best parameters so far and the
validation history. So a run killed at any point and started again with the same command
replays the same batches from its last checkpoint and ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from duet_jax import files, metrics
from duet_jax.checkpoint import Checkpointer
from duet_jax.data.batching import batches, epoch_order, num_batches, padded_batch
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.errors import ConfigError
from duet_jax.methods import Method

MODEL_INPUTS = ("click_seq", "trigger_seq", "target", "label", "weight")


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


def _check_run_config(workdir: str, run_config: dict) -> None:
    """Refuse to resume a run under a workdir that was started with another config."""
    path = os.path.join(workdir, "run_config.json")
    run_config = json.loads(files.dumps(run_config))  # compare as stored (tuples -> lists)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = sorted(k for k in set(saved) | set(run_config) if saved.get(k) != run_config.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in diff)
            raise ConfigError(
                "--workdir",
                workdir,
                f"a fresh directory: it holds a run started with a different config ({details})",
            )
        return
    files.write_text_atomic(path, files.dumps(run_config, sort_keys=True))


def train_and_evaluate(
    method: Method,
    data: Splits,
    config: TrainConfig,
    workdir: str,
    seed: int,
    run_config: dict | None = None,
    on_step: Callable[[int], None] | None = None,
    name: str | None = None,
) -> TrainResult:
    """Train ``method`` on ``data.train``, select on ``data.val``, report ``data.test``.

    Checkpoints go to ``workdir/checkpoints``; an existing checkpoint is resumed. What
    defines the run (seed, method, ``config`` except ``progress``, a fingerprint of the data,
    and any extra JSON-able ``run_config``) is stored in ``workdir`` and must match on resume.
    ``on_step(step)`` is called after every optimiser step (logging, tests); ``name`` labels
    the progress bar (default: the method's name).
    """
    train_fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    identity = {
        "seed": seed,
        "method": method.name,
        "train": train_fields,
        "data": data.fingerprint(),
    }
    _check_run_config(workdir, {**identity, **(run_config or {})})
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
        "stopped": False,
        "epoch_loss_sum": 0.0,
        "epoch_loss_count": 0,
        "train_seconds": 0.0,
    }

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore({"train": state, "best_params": best_params})
        state, best_params = restored["train"], restored["best_params"]

    train_step = make_train_step(method.logits, optimizer)
    logits_fn = jax.jit(method.logits)
    steps_per_epoch = num_batches(len(data.train), config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    step = int(state.step)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=name or method.name,
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
        leave=True,
    )
    started = time.perf_counter()
    seconds_before = meta["train_seconds"]

    pending_losses = []  # device scalars, read in order at checkpoints and epoch ends

    def flush_losses():
        for value in jax.device_get(pending_losses):
            meta["epoch_loss_sum"] += float(value)
            meta["epoch_loss_count"] += 1
        pending_losses.clear()

    def save():
        flush_losses()
        meta["train_seconds"] = seconds_before + time.perf_counter() - started
        ckpt.save(step, {"train": state, "best_params": best_params}, meta)

    try:
        while step < total_steps and not meta["stopped"]:
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
            val = evaluate(logits_fn, state.params, data.val, config.eval_batch_size, where)
            score = metrics.selection_score(config.select_metric, val[config.select_metric])
            meta["history"].append(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "train_loss": meta["epoch_loss_sum"] / max(meta["epoch_loss_count"], 1),
                    "val": val,
                }
            )
            meta["epoch_loss_sum"], meta["epoch_loss_count"] = 0.0, 0
            best = meta["best_score"]
            if math.isfinite(score) and (best is None or score > best):
                meta["best_score"], meta["best_epoch"] = score, epoch + 1
                best_params = jax.tree.map(jnp.copy, state.params)
            if config.patience and epoch + 1 - meta["best_epoch"] >= config.patience:
                meta["stopped"] = True
            bar.set_postfix(
                epoch=epoch + 1,
                **{f"val_{config.select_metric}": f"{val[config.select_metric]:.4f}"},
            )
            save()
    finally:
        bar.close()
        ckpt.close()

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
    )
