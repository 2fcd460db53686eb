"""On-device fine-tuning baseline, vmapped across devices.

Every device (user) starts from the trained Base parameters and takes ``k`` Adam steps on
its own most recent labelled samples, then scores its own evaluation samples. This is what
the paper compares DUET against: adaptation with a gradient on the device.

Two stages, so that nothing is selected on test:
- **validation**: every ``(learning_rate, steps)`` in the config's grid is scored on
  validation; the best by ``select_metric`` is kept. How depends on ``selection``:
  ``"train_end"`` (the original protocol): each device fine-tunes on its ``num_samples`` most
  recent cloud-train rows and scores all its validation rows. Base was trained on those
  rows, so fine-tuning on them teaches it little and the selection drifts to the grid's
  smallest settings. ``"val_split"`` (the fair protocol): each device's validation events
  are split in time; it fine-tunes on its ``num_samples`` most recent rows up to the split
  (the early validation events, which Base never trained on, then cloud-train rows) and
  scores the late ones: the test stage shifted back in time, with the same kind of rows to
  tune on and the same class balance to score.
- **test**: each device fine-tunes with the kept setting on its ``num_samples`` most recent
  rows before the device-test period (validation rows first, then train rows), and scores
  its device-test rows.

Shapes are static so ``jit`` compiles once per bucket: devices run in groups of
``group_size`` (the last group padded with empty devices), each device's fine-tuning rows are
padded to ``num_samples`` (``weight = 0``) and its evaluation rows to a power of two. A padded
row has zero weight in the loss, so padding never changes a device's result. Devices are
sorted by evaluation-row count so a group's bucket fits its devices closely.

``params="head"`` fine-tunes the head only (the backbone's features of a device's rows are
computed once, as a device would cache them); ``params="all"`` fine-tunes every parameter.
For a model that declares its per-item tables (``ITEM_TABLES``, :mod:`duet_jax.models`),
each device carries only the table rows its own rows read, renumbered (:func:`local_items`):
a row no id of the device names gets a zero gradient at every step, and Adam's update of a
coordinate whose gradients were all zero is exactly zero, so the other rows would stay Base's
anyway. Same computation, on a table of a few hundred rows instead of every item.

``selection_devices`` caps the devices of the validation stage: a seeded random sample of
that many devices (all of them when there are fewer) tunes and is scored; the test stage
always runs every device. All-parameter fine-tuning of a large dataset's every device at
every learning rate takes hours on a CPU; the selection needs far fewer devices than that.

A step count of 0 is Base itself, not a computation that should merely equal it: its logits
are Base's predictions made exactly as Base's own evaluation makes them
(:func:`base_predictions`: the same function over the same ``eval_batch_size`` batches), so
"0 steps" reproduces Base's metrics bit for bit. (The vmapped path would score the same
parameters with other batch shapes, hence another float32 summation order.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from duet_jax import cache, metrics
from duet_jax.data.batching import bucket_size
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.errors import ConfigError
from duet_jax.models import DeviceModel
from duet_jax.training import TrainConfig, predict

Array = jax.Array
PARAM_MODES = ("head", "all")
SELECTIONS = ("train_end", "val_split")
ROW_FIELDS = ("click_seq", "target", "label")
ITEM_ID_FIELDS = ("click_seq", "target")  # the fields whose values are item ids
EVAL_BATCH_SIZE = TrainConfig.eval_batch_size  # Base's default evaluation batch
# groups per stored part of a stage: the unit an interrupted stage resumes from (16 groups of
# 64 devices: a few minutes of all-parameter fine-tuning on 2 CPU cores)
PART_GROUPS = 16
PARTS_DIRECTORY = "parts"  # under a store's directory: the stages' unfinished parts


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    steps: tuple[int, ...] = (1, 5, 20, 50)  # candidate step counts, chosen on validation
    learning_rates: tuple[float, ...] = (1e-3, 1e-2)  # candidate Adam rates, chosen likewise
    params: str = "head"  # "head" | "all"
    num_samples: int = 64  # most recent labelled rows a device fine-tunes on
    group_size: int = 64  # devices per vmapped group
    select_metric: str = "auc"
    # "train_end": tune on cloud-train rows, score all validation rows (original);
    # "val_split": tune on early validation events, score the late ones (fair; see above)
    selection: str = "train_end"
    # devices the validation stage samples (0 = all); the test stage runs every device
    selection_devices: int = 0
    seed: int = 0  # of that sample
    progress: bool = True

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.finetune.{name}", getattr(self, name), expected)

        steps = tuple(self.steps)
        if not steps or any(
            isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in steps
        ):
            fail("steps", "a non-empty tuple of integers >= 0")
        if len(set(steps)) != len(steps):
            fail("steps", "distinct step counts")
        rates = tuple(self.learning_rates)
        if not rates or any(
            isinstance(r, bool) or not isinstance(r, int | float) or not (r > 0)
            or not math.isfinite(r)
            for r in rates
        ):
            fail("learning_rates", "a non-empty tuple of finite numbers > 0")
        if self.params not in PARAM_MODES:
            fail("params", f"one of {list(PARAM_MODES)}")
        for name in ("num_samples", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "an integer >= 1")
        for name in ("selection_devices", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "an integer >= 0" + (" (0 = every device)"
                                                 if name == "selection_devices" else ""))
        if self.select_metric not in metrics.METRIC_NAMES:
            fail("select_metric", f"one of {list(metrics.METRIC_NAMES)}")
        if self.selection not in SELECTIONS:
            fail("selection", f"one of {list(SELECTIONS)}")


@dataclasses.dataclass
class FinetuneResult:
    test: dict[str, float]  # test metrics with the kept (learning_rate, steps)
    val: dict[str, float]  # validation metrics of the kept setting
    learning_rate: float
    steps: int
    grid: list[dict]  # every (learning_rate, steps) with its validation metrics
    devices: int  # devices fine-tuned for the test stage
    selection_devices: int  # devices the validation stage tuned and scored
    seconds_per_device: float  # adaptation wall time per device, vmapped groups, after warm-up
    # [N_test] logits of every device-test row with the kept setting, in storage order
    test_logits: np.ndarray | None = None


# ------------------------------------------------------------------ devices and their rows


def rows_by_user(user: np.ndarray, num_users: int) -> list[np.ndarray]:
    """Row indices of each user ``0..num_users-1``, in storage (chronological) order."""
    order = np.argsort(user, kind="stable")
    counts = np.bincount(user, minlength=num_users)
    return np.split(order, np.cumsum(counts)[:-1])


@dataclasses.dataclass
class Stage:
    """One fine-tune-then-score stage over all devices.

    ``pool`` holds the rows devices fine-tune on, ``evaluation`` the rows they score;
    ``tune_rows[d]`` / ``eval_rows[d]`` index them for device ``devices[d]``.
    """

    pool: dict[str, np.ndarray]
    evaluation: SampleSet
    devices: np.ndarray  # [D] user ids, sorted by evaluation-row count (descending)
    tune_rows: list[np.ndarray]
    eval_rows: list[np.ndarray]


def event_ids(samples: SampleSet) -> np.ndarray:
    """``[N]`` id of the event each row belongs to (a positive and its sampled negatives share
    one): its ``position`` when the set carries it, else runs of equal ``click_seq`` rows in
    storage order (the authors' files write an event's rows together)."""
    if samples.position is not None:
        return samples.position.astype(np.int64)
    seq = samples.click_seq
    new = np.ones(len(seq), bool)
    new[1:] = np.any(seq[1:] != seq[:-1], axis=1) | (samples.user[1:] != samples.user[:-1])
    return np.cumsum(new) - 1


def split_in_time(samples: SampleSet, num_users: int) -> tuple[SampleSet, SampleSet]:
    """Each user's events in time order, cut in two: ``(early, late)`` with ``n // 2`` early
    events for a user with ``n`` (a user with one event has it in ``late``). An event's rows
    stay together; rows keep their storage order."""
    events = event_ids(samples)
    early = np.zeros(len(samples), bool)
    for rows in rows_by_user(samples.user, num_users):
        if len(rows) == 0:
            continue
        distinct = np.unique(events[rows])  # sorted: positions / runs increase with time
        cut = distinct[len(distinct) // 2] if len(distinct) > 1 else distinct[0]
        early[rows] = events[rows] < cut

    return _subset(samples, early), _subset(samples, ~early)


def _subset(samples: SampleSet, mask: np.ndarray) -> SampleSet:
    """The rows of ``samples`` where ``mask [N]`` holds, in storage order."""
    index = np.flatnonzero(mask)
    position = None if samples.position is None else samples.position[index]
    return SampleSet(**samples.take(index), position=position)


def sample_devices(samples: SampleSet, max_devices: int, seed: int) -> SampleSet:
    """The rows of at most ``max_devices`` users of ``samples``: a random sample drawn with
    ``seed``, or every row when there are no more users than that or ``max_devices`` is 0."""
    users = np.unique(samples.user)
    if max_devices == 0 or len(users) <= max_devices:
        return samples
    keep = np.random.default_rng(seed).choice(users, max_devices, replace=False)
    return _subset(samples, np.isin(samples.user, keep))


def _concat(sets: list[SampleSet]) -> dict[str, np.ndarray]:
    return {f: np.concatenate([getattr(s, f) for s in sets]) for f in ROW_FIELDS}


def make_stage(tune_sets: list[SampleSet], evaluation: SampleSet, num_users: int,
               num_samples: int) -> Stage:
    """Devices = users with evaluation rows; each fine-tunes on its ``num_samples`` most
    recent rows of ``tune_sets`` (in order: later sets are more recent)."""
    offsets = np.cumsum([0] + [len(s) for s in tune_sets])
    per_set = [rows_by_user(s.user, num_users) for s in tune_sets]
    eval_by_user = rows_by_user(evaluation.user, num_users)
    counts = np.array([len(r) for r in eval_by_user])
    devices = np.flatnonzero(counts > 0)
    devices = devices[np.argsort(-counts[devices], kind="stable")]
    tune_rows = []
    for u in devices:
        rows = np.concatenate([per_set[i][u] + offsets[i] for i in range(len(tune_sets))])
        tune_rows.append(rows[-num_samples:])
    return Stage(
        pool=_concat(tune_sets),
        evaluation=evaluation,
        devices=devices,
        tune_rows=tune_rows,
        eval_rows=[eval_by_user[u] for u in devices],
    )


def _pad_rows(rows: list[np.ndarray], width: int, group: int) -> np.ndarray:
    """``[group, width]`` row indices, -1 where padded (rows beyond a device, empty devices)."""
    out = np.full((group, width), -1, np.int64)
    for d, r in enumerate(rows):
        out[d, : len(r)] = r
    return out


def _gather(arrays: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``index [G, S]`` (-1 = padding) -> batch ``[G, S, ...]`` with ``weight``."""
    safe = np.maximum(index, 0)
    batch = {f: arrays[f][safe] for f in ROW_FIELDS}
    batch["weight"] = (index >= 0).astype(np.float32)
    return batch


def stage_groups(stage: Stage, group_size: int, num_samples: int):
    """Yield ``(first_device, count, tune_batch [G, S], eval_batch [G, E], eval_index)``."""
    eval_arrays = {f: getattr(stage.evaluation, f) for f in ROW_FIELDS}
    for start in range(0, len(stage.devices), group_size):
        tune = stage.tune_rows[start : start + group_size]
        evaluate = stage.eval_rows[start : start + group_size]
        width = bucket_size(max(len(r) for r in evaluate), 8)
        eval_index = _pad_rows(evaluate, width, group_size)
        yield (
            start,
            len(tune),
            _gather(stage.pool, _pad_rows(tune, num_samples, group_size)),
            _gather(eval_arrays, eval_index),
            eval_index,
        )


def local_items(*batches: dict) -> tuple[np.ndarray, tuple[dict, ...]]:
    """Each device's own item numbering, for a group's ``batches`` (``[G, ...]`` each).

    -> ``(item_rows [G, V], renumbered)``: ``item_rows[d]`` lists the distinct item ids that
    device ``d``'s rows read (``ITEM_ID_FIELDS`` of every batch), ascending, 0 (padding)
    first, then 0 again up to ``V`` (a power of two >= 8, so few shapes compile);
    ``renumbered`` holds copies of the batches with every id replaced by its index in that
    list. Index 0 is still padding, so the model reads ``table[item_rows[d]]`` exactly as it
    read ``table``."""
    groups = batches[0][ITEM_ID_FIELDS[0]].shape[0]
    per_device = [
        np.unique(np.concatenate([np.zeros(1, np.int64)] + [
            np.ravel(batch[f][d]) for batch in batches for f in ITEM_ID_FIELDS]))
        for d in range(groups)
    ]
    width = bucket_size(max(len(ids) for ids in per_device), 8)
    item_rows = np.zeros((groups, width), np.int32)
    renumbered = tuple({**batch, **{f: np.empty_like(batch[f]) for f in ITEM_ID_FIELDS}}
                       for batch in batches)
    for d, ids in enumerate(per_device):
        item_rows[d, : len(ids)] = ids
        for new, old in zip(renumbered, batches, strict=True):
            for f in ITEM_ID_FIELDS:
                new[f][d] = np.searchsorted(ids, old[f][d])
    return item_rows, renumbered


def uses_local_items(model: DeviceModel, mode: str) -> bool:
    """Whether fine-tuning in ``mode`` carries only each device's own item rows: all
    parameters, of a model that declares its item tables."""
    return mode == "all" and bool(model.item_tables)


def group_inputs(model: DeviceModel, mode: str, *batches: dict
                 ) -> tuple[np.ndarray | None, tuple[dict, ...]]:
    """``(item_rows, batches)`` for a group's fine-tuning: :func:`local_items` where
    :func:`uses_local_items`, else ``(None, batches)`` unchanged."""
    if uses_local_items(model, mode):
        return local_items(*batches)
    return None, batches


def _local_tables(model: DeviceModel, params: dict, item_rows: Array) -> dict:
    """``params`` with each of the model's item tables cut to the rows ``item_rows [V]``."""
    backbone = dict(params["backbone"])
    for name in model.item_tables:
        backbone[name] = backbone[name][item_rows]
    return {**params, "backbone": backbone}


# ---------------------------------------------------------------- vmapped fine-tuning


def _bce(logits: Array, labels: Array, weights: Array) -> Array:
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _split_params(params: dict, mode: str) -> tuple[Any, Any]:
    """-> ``(trainable, fixed)``: the head and the backbone, or everything and nothing."""
    if mode == "head":
        return params["head"], params["backbone"]
    return params, None


def _device_fns(model: DeviceModel, mode: str):
    """``prepare(fixed, batch) -> inputs`` and ``logits(trainable, fixed, inputs)`` for one
    device. Head mode prepares backbone features once (the backbone does not change)."""
    if mode == "head":
        return (
            lambda fixed, batch: model.encode(fixed, batch),
            lambda head, fixed, features: model.head_logits(head, features),
        )
    return (
        lambda fixed, batch: batch,
        lambda params, fixed, batch: model.apply(params["backbone"], params["head"], batch),
    )


def _adapt(model: DeviceModel, mode: str, trainable, fixed, tune_batch: dict,
           learning_rate: Array, schedule: tuple[int, ...], on_checkpoint: Callable):
    """Adam on one device's rows; ``on_checkpoint(trainable)`` after each count in the sorted
    ``schedule`` (0 = before any step). Returns the list of what it returned."""
    prepare, logits = _device_fns(model, mode)
    inputs = prepare(fixed, tune_batch)
    optimizer = optax.adam(learning_rate)

    def loss(p):
        return _bce(logits(p, fixed, inputs), tune_batch["label"], tune_batch["weight"])

    def step(_, state):
        p, opt_state = state
        grads = jax.grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    state, done, outputs = (trainable, optimizer.init(trainable)), 0, []
    for count in schedule:
        state = jax.lax.fori_loop(0, count - done, step, state)
        done = count
        outputs.append(on_checkpoint(state[0]))
    return outputs


@functools.partial(jax.jit, static_argnames=("model", "mode", "schedule"))
def finetune_and_score(model: DeviceModel, mode: str, trainable, fixed, tune_batch: dict,
                       eval_batch: dict, learning_rate: Array, schedule: tuple[int, ...],
                       item_rows: Array | None = None) -> Array:
    """Fine-tune every device of a group and score its evaluation rows after each step count
    in ``schedule`` (sorted). ``tune_batch [G, S, ...]``, ``eval_batch [G, E, ...]`` ->
    logits ``[len(schedule), G, E]``. ``item_rows [G, V]``: the batches' ids are each
    device's own numbering (:func:`local_items`; ``mode="all"`` only)."""
    prepare, logits = _device_fns(model, mode)

    def one(tune, evaluate, rows):
        start = trainable if rows is None else _local_tables(model, trainable, rows)
        eval_inputs = prepare(fixed, evaluate)
        outs = _adapt(model, mode, start, fixed, tune, learning_rate, schedule,
                      lambda p: logits(p, fixed, eval_inputs))
        return jnp.stack(outs)

    return jnp.swapaxes(jax.vmap(one)(tune_batch, eval_batch, item_rows), 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "mode", "steps"))
def finetune_params(model: DeviceModel, mode: str, trainable, fixed, tune_batch: dict,
                    learning_rate: Array, steps: int, item_rows: Array | None = None):
    """Adaptation alone (what a device runs): ``steps`` Adam steps per device of a group ->
    the fine-tuned trainable parameters with a leading ``[G]`` axis. With ``item_rows
    [G, V]`` (:func:`local_items`) a device's item tables are its own rows ``[V, ...]``."""

    def one(tune, rows):
        start = trainable if rows is None else _local_tables(model, trainable, rows)
        return _adapt(model, mode, start, fixed, tune, learning_rate, (steps,),
                      lambda p: p)[0]

    return jax.vmap(one)(tune_batch, item_rows)


@functools.partial(jax.jit, static_argnames=("model",))
def _base_logits(model: DeviceModel, params: dict, batch: dict) -> Array:
    """Base's logits of a batch: the computation of ``methods.base_method(model).logits``."""
    return model.apply(params["backbone"], params["head"], batch)


def base_predictions(model: DeviceModel, params: dict, samples: SampleSet,
                     eval_batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Base's logits ``[N]`` of ``samples``, in storage order, made as Base's evaluation makes
    them (:func:`duet_jax.training.predict`, same batch size): what a device that takes 0
    fine-tuning steps scores."""
    return predict(functools.partial(_base_logits, model), params, samples, eval_batch_size)


def run_stage(model: DeviceModel, params: dict, stage: Stage, config: FinetuneConfig,
              learning_rate: float, schedule: tuple[int, ...], desc: str,
              eval_batch_size: int = EVAL_BATCH_SIZE,
              parts: tuple[str, dict] | None = None) -> np.ndarray:
    """Logits ``[len(schedule), N_eval]`` of every evaluation row, in storage order. A count
    of 0 in ``schedule`` (sorted) is Base's own predictions (:func:`base_predictions`).

    ``parts``: ``(directory, identity)`` where each run of :data:`PART_GROUPS` consecutive
    groups stores its logits as it finishes (:func:`duet_jax.cache.cached_array`), so an
    interrupted stage resumes after its last finished part. A group's result depends on its
    own devices only, and a part is always the same groups, so a resumed stage returns the
    logits an uninterrupted one would, bit for bit."""
    out = np.zeros((len(schedule), len(stage.evaluation)), np.float32)
    if schedule and schedule[0] == 0:
        out[0] = base_predictions(model, params, stage.evaluation, eval_batch_size)
    tuned = tuple(s for s in schedule if s > 0)
    if not tuned:
        return out
    trainable, fixed = _split_params(params, config.params)
    first = len(schedule) - len(tuned)
    groups = stage_groups(stage, config.group_size, config.num_samples)
    total = -(-len(stage.devices) // config.group_size)

    def compute(chunk) -> np.ndarray:
        """``[len(tuned), rows]`` logits of a part's evaluation rows (:func:`_part_rows`)."""
        pieces = []
        for _, count, tune, evaluate, index in chunk:
            item_rows, (tune, evaluate) = group_inputs(model, config.params, tune, evaluate)
            logits = np.asarray(finetune_and_score(model, config.params, trainable, fixed,
                                                   tune, evaluate, jnp.float32(learning_rate),
                                                   tuned, item_rows))
            pieces.append(logits[:, :count][:, index[:count] >= 0])
        return np.concatenate(pieces, axis=1)

    with tqdm(total=total, desc=desc, unit="group", disable=not config.progress,
              leave=False) as bar:
        for number in itertools.count():
            chunk = list(itertools.islice(groups, PART_GROUPS))
            if not chunk:
                break
            if parts is None:
                logits = compute(chunk)
            else:
                directory, identity = parts
                logits = cache.cached_array(
                    os.path.join(directory, f"part{number:05d}.npy"),
                    {**identity, "part": number, "groups_per_part": PART_GROUPS},
                    functools.partial(compute, chunk))
            out[first:, _part_rows(chunk)] = logits
            bar.update(len(chunk))
    return out


def _part_rows(chunk: list) -> np.ndarray:
    """Evaluation-row indices of a part's groups (``stage_groups`` items), in the order
    :func:`run_stage` lays out a part's logits: group by group, device by device."""
    return np.concatenate([index[:count][index[:count] >= 0]
                           for _, count, _, _, index in chunk])


def remove_parts(directory: str) -> None:
    """Delete the stored parts of ``directory``'s stages (:func:`run_stage`), once what they
    make up is stored whole."""
    shutil.rmtree(os.path.join(directory, PARTS_DIRECTORY), ignore_errors=True)


def time_adaptation(model: DeviceModel, params: dict, stage: Stage, config: FinetuneConfig,
                    learning_rate: float, steps: int, max_groups: int = 8) -> float:
    """Wall seconds per device of fine-tuning alone (vmapped groups), after one warm-up, over
    the stage's first ``max_groups`` groups (every group has the same ``[G, S]`` shape, so a
    few represent all; timing each of a large dataset's devices would cost another stage)."""
    trainable, fixed = _split_params(params, config.params)
    batches = []
    for _, count, tune, _, _ in itertools.islice(
            stage_groups(stage, config.group_size, config.num_samples), max_groups):
        rows, (tune,) = group_inputs(model, config.params, tune)
        batches.append((count, tune, rows))
    if not batches:
        return float("nan")
    lr = jnp.float32(learning_rate)

    def adapt(tune, rows):
        return jax.block_until_ready(finetune_params(model, config.params, trainable, fixed,
                                                     tune, lr, steps, rows))

    adapt(*batches[0][1:])  # warm-up (compilation)
    started = time.perf_counter()
    for _, tune, rows in batches:
        adapt(tune, rows)
    return (time.perf_counter() - started) / sum(count for count, _, _ in batches)


def finetune_and_evaluate(model: DeviceModel, base_params: dict, data: Splits,
                          config: FinetuneConfig,
                          eval_batch_size: int = EVAL_BATCH_SIZE,
                          store: tuple[str, dict] | None = None) -> FinetuneResult:
    """Select ``(learning_rate, steps)`` on validation, then report device-test.

    ``eval_batch_size``: Base's evaluation batch size (``TrainConfig.eval_batch_size``), so
    that 0 steps scores exactly Base's predictions. ``store``: ``(directory, identity)``
    where each learning rate's validation logits are kept as they finish
    (:func:`duet_jax.cache.cached_array`; ``identity`` must name everything they depend on:
    Base's parameters, the data, this config), so an interrupted run resumes after the last
    finished learning rate (all-parameter fine-tuning of a large dataset takes hours). Within
    a stage, finished parts of :data:`PART_GROUPS` groups are kept under
    ``directory/parts/`` (:func:`run_stage`): a learning rate's are removed once its logits
    are stored whole, the test stage's are left for the caller to remove
    (:func:`remove_parts`) once it has stored the test logits."""
    if config.selection == "val_split":
        tune_part, selection_rows = split_in_time(data.val, data.num_users)
        tune_sets = [data.train, tune_part]
    else:
        selection_rows, tune_sets = data.val, [data.train]
    selection_rows = sample_devices(selection_rows, config.selection_devices, config.seed)
    val_stage = make_stage(tune_sets, selection_rows, data.num_users, config.num_samples)
    schedule = tuple(sorted(config.steps))
    if store is not None:
        os.makedirs(store[0], exist_ok=True)
    grid, best = [], None
    for lr in config.learning_rates:
        val_identity = {"learning_rate": lr, "schedule": list(schedule),
                        "selection": config.selection}
        if store is None:
            logits = run_stage(model, base_params, val_stage, config, lr, schedule,
                               f"finetune val lr={lr:g}", eval_batch_size)
        else:
            directory, identity = store
            parts = (os.path.join(directory, PARTS_DIRECTORY, f"val_lr{lr:g}"),
                     {**identity, **val_identity, "stage": "val"})
            logits = cache.cached_array(
                os.path.join(directory, f"val_logits_lr{lr:g}.npy"),
                {**identity, **val_identity},
                lambda lr=lr, parts=parts: run_stage(model, base_params, val_stage, config, lr,
                                                     schedule, f"finetune val lr={lr:g}",
                                                     eval_batch_size, parts))
            shutil.rmtree(parts[0], ignore_errors=True)  # stored whole now
        for steps, row in zip(schedule, logits, strict=True):
            val = metrics.evaluate(selection_rows.user, selection_rows.label, row)
            grid.append({"learning_rate": lr, "steps": steps, "val": val})
            score = metrics.selection_score(config.select_metric, val[config.select_metric])
            if best is None or score > best[0]:
                best = (score, lr, steps, val)
    _, lr, steps, val = best
    test_stage = make_stage([data.train, data.val], data.test, data.num_users,
                            config.num_samples)
    parts = None
    if store is not None:  # removed by the caller once it has stored the test logits
        parts = (os.path.join(store[0], PARTS_DIRECTORY, f"test_lr{lr:g}_steps{steps}"),
                 {**store[1], "learning_rate": lr, "steps": steps, "stage": "test"})
    logits = run_stage(model, base_params, test_stage, config, lr, (steps,), "finetune test",
                       eval_batch_size, parts)
    test = metrics.evaluate(data.test.user, data.test.label, logits[0])
    seconds = time_adaptation(model, base_params, test_stage, config, lr, steps)
    return FinetuneResult(test=test, val=val, learning_rate=lr, steps=steps, grid=grid,
                          devices=len(test_stage.devices),
                          selection_devices=len(val_stage.devices), seconds_per_device=seconds,
                          test_logits=logits[0])

