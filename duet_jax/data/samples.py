"""Labelled samples from chronological item sequences
(docs/datasets.md, "Periods and samples" and "Deployment protocol").

Each user's sequence is cut at two boundaries into cloud-train (oldest), cloud-validation
and device-test (newest). Every position ``t`` (with at least ``min_history`` earlier items)
gives one positive sample: ``click_seq`` = the ``seq_len`` latest items before ``t``
(oldest first, right-padded with 0), ``target`` = item ``t``, ``label`` = 1; plus
``num_negatives`` (train) or ``eval_negatives`` (validation/test) negatives sharing its
sequences, each an item the user never touched anywhere in the sequence (uniform, seeded).

``trigger_seq`` is the sequence the generator reads: the device's sequence at a *sync*.
Syncs happen at the start of each period and every ``sync_every`` positions after it (the
cloud-train period starts at ``min_history``: a device syncs only once it has that much
history). With sync lag ``k`` the row at ``t`` uses the last sync at or before
``max(t - k, min_history)``, so the trigger never reaches before the first sync and is never
empty. ``k = 0`` with ``sync_every=1`` gives ``trigger_seq == click_seq`` (the authors'
per-sample generation); ``sync_every > 1`` adds the schedule's own staleness on top of ``k``.
Cloud-train/validation rows draw ``k`` uniformly from ``SampleConfig.train_lags``; device-test
rows are built at ``k = 0``. :func:`with_trigger` rebuilds a split's triggers at another lag,
or ``"once"`` per device (frozen at the start of the row's period), from the full sequences
that :class:`Splits` keeps in ``history``; every other array stays as built.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

import numpy as np

from duet_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
TRIGGER_MODES = ("lag", "once")
# Lag draws get their own stream of the data seed, so the negatives' stream (and with it
# every array of the default train_lags=(0,)) is exactly what it was before lags existed.
_LAG_STREAM = 1


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How samples are made (module docstring). Errors name the experiment-config field."""

    seq_len: int = 30
    num_negatives: int = 1
    eval_negatives: int = 4
    sync_every: int = 1
    min_history: int = 1
    # sync lag of each cloud-train/validation positive, drawn uniformly from these entries
    # (seeded by the data seed): train with the lags the model will be served with
    train_lags: tuple[int, ...] = (0,)
    # evaluation only (not part of the built samples): device-test is also scored with the
    # trigger rebuilt at each of these lags, and, if eval_once, frozen once per device
    eval_lags: tuple[int, ...] = ()
    eval_once: bool = False

    # fields that only choose evaluations of the built samples (leave them out of cache keys)
    EVAL_FIELDS: ClassVar[tuple[str, ...]] = ("eval_lags", "eval_once")

    def __post_init__(self):
        for name, low in [
            ("seq_len", 1),
            # 0 negatives would train on positives only (num_negatives) or leave evaluation
            # nothing to rank (eval_negatives): neither can mean what it says
            ("num_negatives", 1),
            ("eval_negatives", 1),
            ("sync_every", 1),
            ("min_history", 1),
        ]:
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(_path(name), value, f"an integer >= {low}")
        for name, empty in (("train_lags", False), ("eval_lags", True)):
            value = getattr(self, name)
            ok = isinstance(value, tuple | list) and (empty or len(value) > 0)
            if not ok or not all(_is_int(k) and k >= 0 for k in value):
                what = "a tuple" if empty else "a non-empty tuple"
                raise ConfigError(_path(name), value, f"{what} of integers >= 0 (sync lags)")
            # a list (JSON, the command line) becomes a tuple of plain ints
            object.__setattr__(self, name, tuple(int(k) for k in value))
        if len(set(self.eval_lags)) != len(self.eval_lags):
            raise ConfigError(_path("eval_lags"), self.eval_lags, "distinct lags")
        if not isinstance(self.eval_once, bool | np.bool_):
            raise ConfigError(_path("eval_once"), self.eval_once, "True or False")
        object.__setattr__(self, "eval_once", bool(self.eval_once))

    def build_fields(self) -> dict:
        """The fields that shape the built :class:`Splits` (a cache key): all but
        ``EVAL_FIELDS``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EVAL_FIELDS}

    def trigger_variants(self) -> tuple[tuple[str, str, int], ...]:
        """``(name, mode, lag)`` of each extra device-test evaluation, for
        :func:`with_trigger`: ``("lag5", "lag", 5)`` per eval lag, then ``("once", "once", 0)``."""
        out = tuple((f"lag{k}", "lag", k) for k in self.eval_lags)
        return out + ((("once", "once", 0),) if self.eval_once else ())

    @property
    def needs_history(self) -> bool:
        """Whether these fields need users' full sequences (lagged training or evaluation)."""
        return self.train_lags != (0,) or bool(self.trigger_variants())


def _path(name: str) -> str:
    return "config.seq_len" if name == "seq_len" else f"config.data.{name}"


@dataclasses.dataclass
class SampleSet:
    """One split's samples; every array has a leading sample axis ``[N]``.

    ``FIELDS`` are what models read (``arrays``, ``take`` and batches hold only them).
    ``position`` is bookkeeping for :func:`with_trigger`: built samples carry it, and sets
    read from the authors' files or cut out with ``take`` do not (None).
    """

    user: np.ndarray  # [N] int32
    click_seq: np.ndarray  # [N, L] int32, right-padded with 0
    trigger_seq: np.ndarray  # [N, L] int32, right-padded with 0
    target: np.ndarray  # [N] int32
    label: np.ndarray  # [N] float32, 1 = clicked
    position: np.ndarray | None = None  # [N] int32: t, the positive's index in its user's items

    FIELDS = ("user", "click_seq", "trigger_seq", "target", "label")

    def __len__(self) -> int:
        return len(self.label)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {f: getattr(self, f)[index] for f in self.FIELDS}


@dataclasses.dataclass
class History:
    """Every user's full item sequence, its period boundaries and the sync schedule: what
    :func:`with_trigger` needs to rebuild a trigger. ``U`` users, ``T`` items in all."""

    items: np.ndarray  # [T] int32, user u's items are items[offsets[u]:offsets[u + 1]]
    offsets: np.ndarray  # [U + 1] int64
    val_start: np.ndarray  # [U] int64, first cloud-validation position
    test_start: np.ndarray  # [U] int64, first device-test position
    min_history: int
    sync_every: int

    ARRAYS = ("items", "offsets", "val_start", "test_start")

    def period_start(self, user: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``[N]`` first sync of the period holding position ``t`` (train: ``min_history``)."""
        vs, ts = self.val_start[user], self.test_start[user]
        return np.where(t < vs, self.min_history, np.where(t < ts, vs, ts))

    def trigger_end(self, user: np.ndarray, t: np.ndarray, mode: str, lag) -> np.ndarray:
        """``[N]`` position of the sync whose sequence (the items before it) is the trigger of
        the row at ``t``: ``"lag"``, the last sync at or before ``max(t - lag, min_history)``
        (``lag`` an int or ``[N]``); ``"once"``, the first sync of ``t``'s period."""
        t = np.asarray(t, np.int64)
        if mode == "once":
            return self.period_start(user, t)
        # rows have t >= min_history, so the clipped position p is in [min_history, t]
        p = np.maximum(t - np.asarray(lag, np.int64), self.min_history)
        start = self.period_start(user, p)
        return start + (p - start) // self.sync_every * self.sync_every

    def windows(self, user: np.ndarray, ends: np.ndarray, seq_len: int) -> np.ndarray:
        """``[N, seq_len]`` the ``seq_len`` latest items of ``user`` before position ``ends``."""
        start = self.offsets[user]
        return _windows(self.items, start, start + ends, seq_len)


@dataclasses.dataclass
class Splits:
    train: SampleSet
    val: SampleSet
    test: SampleSet
    num_users: int
    num_items: int
    # how the samples were made (dataset statistics); reported, not part of the fingerprint
    info: dict = dataclasses.field(default_factory=dict)
    # users' full sequences for with_trigger; None when the source has none (authors' text).
    # Not fingerprinted: the sample arrays are derived from it.
    history: History | None = None
    # original ids of dense users [U] / items [num_items + 1] (0: padding) where the source's
    # ids were renumbered (sparse ids); None: the arrays hold the source's own ids
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None

    def fingerprint(self) -> str:
        """sha256 of every split's arrays and id ranges (a resumed run must see the same data)."""
        digest = hashlib.sha256(f"{self.num_users}:{self.num_items}".encode())
        for name in SPLITS:
            for field, array in getattr(self, name).arrays().items():
                digest.update(f"{name}.{field}{array.shape}{array.dtype}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        out = {**self.info, "users": self.num_users, "items": self.num_items}
        for name in SPLITS:
            s = getattr(self, name)
            out[f"{name}_samples"] = len(s)
            out[f"{name}_positives"] = int(s.label.sum())
        return out


def _windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, seq_len: int) -> np.ndarray:
    """``items[max(start, end - L):end]`` per row, oldest first, right-padded -> ``[P, L]``."""
    lengths = np.minimum(ends - starts, seq_len)
    j = np.arange(seq_len)[None, :]
    src = (ends - lengths)[:, None] + j
    valid = j < lengths[:, None]
    return np.where(valid, items[np.where(valid, src, 0)], 0).astype(np.int32)


def _repeated_in_row(values: np.ndarray) -> np.ndarray:
    """``[P, C]`` bool: True where a value already appeared earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeat = np.zeros_like(values, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    out = np.zeros_like(repeat)
    np.put_along_axis(out, order, repeat, axis=1)
    return out


def _sample_negatives(
    rng: np.random.Generator,
    users: np.ndarray,
    touched: np.ndarray,
    touched_count: np.ndarray,
    num_items: int,
    count: int,
) -> np.ndarray:
    """``[P, count]`` distinct uniform items in ``1..num_items`` that each row's user never
    touched. ``touched`` is the sorted array of keys ``user * (num_items + 1) + item``;
    ``touched_count[u]`` is how many items user ``u`` touched.
    """
    short = np.flatnonzero(num_items - touched_count[users] < count)
    if len(short):
        u = int(users[short[0]])
        raise DataError(
            f"user {u} touched {int(touched_count[u])} of {num_items} items, leaving fewer than "
            f"the {count} distinct negatives each of its samples needs"
        )
    out = rng.integers(1, num_items + 1, size=(len(users), count))
    base = users.astype(np.int64)[:, None] * (num_items + 1)
    while True:  # terminates: every row has at least `count` untouched items to find
        keys = base + out
        pos = np.searchsorted(touched, keys)
        bad = (touched[np.minimum(pos, len(touched) - 1)] == keys) | _repeated_in_row(out)
        if not bad.any():
            return out.astype(np.int32)
        out[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))


def build_samples(
    sequences: list[np.ndarray],
    val_start: np.ndarray,
    test_start: np.ndarray,
    num_items: int,
    config: SampleConfig,
    seed: int,
) -> Splits:
    """Samples for all users. User ``u`` is ``sequences[u]`` (item ids in ``1..num_items``,
    chronological); its positions ``[val_start[u], test_start[u])`` are validation and
    ``[test_start[u], len)`` device-test. Deterministic in ``seed``.
    """
    num_users = len(sequences)
    lengths = np.array([len(s) for s in sequences], np.int64)
    val_start = np.asarray(val_start, np.int64)
    test_start = np.asarray(test_start, np.int64)
    if not (len(val_start) == len(test_start) == num_users):
        raise DataError(
            f"val_start ({len(val_start)} entries) and test_start ({len(test_start)}) need one "
            f"entry per user ({num_users} sequences)"
        )
    bad = np.flatnonzero((val_start > test_start) | (test_start > lengths) | (val_start < 0))
    if len(bad):
        u = int(bad[0])
        raise DataError(
            f"user {u}: split boundaries val_start={val_start[u]}, test_start={test_start[u]} "
            f"do not satisfy 0 <= val_start <= test_start <= length={lengths[u]}"
        )
    items = np.concatenate(sequences).astype(np.int64) if num_users else np.zeros(0, np.int64)
    if items.size and (items.min() < 1 or items.max() > num_items):
        bad = int(np.flatnonzero((items < 1) | (items > num_items))[0])
        user = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise DataError(
            f"user {user}: item id {int(items[bad])} is outside 1..{num_items} "
            f"(ids {items.min()}..{items.max()} overall)"
        )
    offsets = np.r_[0, np.cumsum(lengths)]
    history = History(
        items=items.astype(np.int32),
        offsets=offsets,
        val_start=val_start,
        test_start=test_start,
        min_history=int(config.min_history),
        sync_every=int(config.sync_every),
    )
    user_of = np.repeat(np.arange(num_users), lengths)
    t = np.arange(len(items)) - offsets[user_of]  # position within the user's sequence
    touched = np.unique(user_of * (num_items + 1) + items)
    touched_count = np.bincount(touched // (num_items + 1), minlength=num_users)

    rng = np.random.default_rng(seed)
    lag_rng = np.random.default_rng([seed, _LAG_STREAM])
    train_lags = np.asarray(config.train_lags, np.int64)
    split_of = np.where(t < val_start[user_of], 0, np.where(t < test_start[user_of], 1, 2))
    eligible = t >= config.min_history
    out = {}
    for split_id, name in enumerate(SPLITS):
        rows = np.flatnonzero(eligible & (split_of == split_id))  # global item index
        u = user_of[rows]
        click = _windows(items, offsets[u], rows, config.seq_len)
        # device-test is built at lag 0; with_trigger rebuilds it at any other
        lag = 0 if name == "test" else train_lags[lag_rng.integers(len(train_lags), size=len(u))]
        end = history.trigger_end(u, t[rows], "lag", lag)
        trigger = history.windows(u, end, config.seq_len)
        n_neg = config.num_negatives if name == "train" else config.eval_negatives
        negatives = _sample_negatives(rng, u, touched, touched_count, num_items, n_neg)
        per = 1 + n_neg
        targets = np.concatenate([items[rows][:, None], negatives], axis=1).reshape(-1)
        labels = np.zeros((len(rows), per), np.float32)
        labels[:, 0] = 1.0
        out[name] = SampleSet(
            user=np.repeat(u, per).astype(np.int32),
            click_seq=np.repeat(click, per, axis=0),
            trigger_seq=np.repeat(trigger, per, axis=0),
            target=targets.astype(np.int32),
            label=labels.reshape(-1),
            position=np.repeat(t[rows], per).astype(np.int32),
        )
    return Splits(**out, num_users=num_users, num_items=num_items, history=history)


def with_trigger(splits: Splits, split: str = "test", mode: str = "lag", lag: int = 0) -> SampleSet:
    """``splits.<split>`` with ``trigger_seq`` rebuilt under the deployment protocol; every
    other array (user, click_seq, target, label, position) is the same object as built.

    ``mode="lag"``: the sequence at the last sync at or before ``max(t - lag, min_history)``
    (``sync_every=1``: exactly the ``seq_len`` items before ``t - lag``, clipped to the
    user's first ``min_history`` items). ``mode="once"`` (``lag`` must be 0): the sequence
    at the start of the row's period, the same for all of a device's rows (device-test: the
    items before the first device-test position). Raises DataError when ``splits`` keep no
    user sequences (the authors' text format).
    """
    if split not in SPLITS:
        raise ValueError(f"with_trigger: split {split!r} is not one of {list(SPLITS)}")
    if mode not in TRIGGER_MODES:
        raise ValueError(f"with_trigger: mode {mode!r} is not one of {list(TRIGGER_MODES)}")
    if not _is_int(lag) or lag < 0 or (mode == "once" and lag != 0):
        expected = "0 (a once-per-device trigger has no lag)" if mode == "once" else "an int >= 0"
        raise ValueError(f"with_trigger: lag {lag!r} is invalid: expected {expected}")
    samples = getattr(splits, split)
    if splits.history is None or samples.position is None:
        dataset = splits.info.get("dataset", "these splits")
        raise DataError(
            f"{dataset}: no full user sequences are kept (the DUET authors' text format stores "
            f"each sample's sequences only), so trigger mode {mode!r} cannot be built; use "
            f"a dataset built from sequences (synthetic or a real dataset)"
        )
    if len(samples.position) != len(samples):
        raise DataError(
            f"{split}: {len(samples.position)} positions for {len(samples)} samples; the set "
            f"was changed after it was built"
        )
    end = splits.history.trigger_end(samples.user, samples.position, mode, lag)
    trigger = splits.history.windows(samples.user, end, samples.click_seq.shape[1])
    return dataclasses.replace(samples, trigger_seq=trigger)
