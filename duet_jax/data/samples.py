"""Labelled samples from chronological item sequences
(docs/datasets.md, "Periods and samples").

Each user's sequence is cut at two boundaries into cloud-train (oldest), cloud-validation
and device-test (newest). Every position ``t`` (with at least ``min_history`` earlier items)
gives one positive sample: ``click_seq`` = the ``seq_len`` latest items before ``t``
(oldest first, right-padded with 0), ``target`` = item ``t``, ``label`` = 1; plus
``num_negatives`` (train) or ``eval_negatives`` (validation/test) negatives sharing its
sequences, each an item the user never touched anywhere in the sequence (uniform, seeded).
``trigger_seq`` is the sequence at the device's last sync: syncs happen at the start of each
period and every ``sync_every`` positions after it (``sync_every=1``: before every
prediction, so ``trigger_seq == click_seq``, as the authors' per-sample generation does).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from duet_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    seq_len: int = 30
    num_negatives: int = 1
    eval_negatives: int = 4
    sync_every: int = 1
    min_history: int = 1

    def __post_init__(self):
        for name, low in [
            ("seq_len", 1),
            ("num_negatives", 0),
            ("eval_negatives", 0),
            ("sync_every", 1),
            ("min_history", 1),
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigError(f"SampleConfig.{name}", value, f"an integer >= {low}")


@dataclasses.dataclass
class SampleSet:
    """One split's samples; every array has a leading sample axis ``[N]``."""

    user: np.ndarray  # [N] int32
    click_seq: np.ndarray  # [N, L] int32, right-padded with 0
    trigger_seq: np.ndarray  # [N, L] int32, right-padded with 0
    target: np.ndarray  # [N] int32
    label: np.ndarray  # [N] float32, 1 = clicked

    FIELDS = ("user", "click_seq", "trigger_seq", "target", "label")

    def __len__(self) -> int:
        return len(self.label)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {f: getattr(self, f)[index] for f in self.FIELDS}


@dataclasses.dataclass
class Splits:
    train: SampleSet
    val: SampleSet
    test: SampleSet
    num_users: int
    num_items: int
    # how the samples were made (dataset statistics); reported, not part of the fingerprint
    info: dict = dataclasses.field(default_factory=dict)

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
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    user_of = np.repeat(np.arange(num_users), lengths)
    t = np.arange(len(items)) - offsets[user_of]  # position within the user's sequence
    touched = np.unique(user_of * (num_items + 1) + items)
    touched_count = np.bincount(touched // (num_items + 1), minlength=num_users)

    rng = np.random.default_rng(seed)
    split_of = np.where(t < val_start[user_of], 0, np.where(t < test_start[user_of], 1, 2))
    period_start = np.choose(
        split_of, [np.full_like(t, config.min_history), val_start[user_of], test_start[user_of]]
    )
    sync = period_start + (t - period_start) // config.sync_every * config.sync_every
    eligible = t >= config.min_history
    out = {}
    for split_id, name in enumerate(SPLITS):
        rows = np.flatnonzero(eligible & (split_of == split_id))  # global item index
        u, ends = user_of[rows], rows
        click = _windows(items, offsets[u], ends, config.seq_len)
        trigger = _windows(items, offsets[u], offsets[u] + sync[rows], config.seq_len)
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
        )
    return Splits(**out, num_users=num_users, num_items=num_items)
