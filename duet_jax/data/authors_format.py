"""The DUET authors' released text format, read and written unchanged.

One sample per line, five fields separated by ``;``::

    user;target;trigger_seq;click_seq;label
    17;532;12,40,7,0,0;12,40,7,9,0;1

Sequences are comma-separated item ids, oldest first, right-padded with 0 (the authors' code
reads them with ``np.fromstring(..., sep=",")``); ``label`` is 0 or 1. Sequences of any
length are accepted and fitted to ``seq_len`` by keeping the latest items.

The format holds each sample's sequences but not the users' full item sequences, so the
deployment protocol's rebuilt triggers (sync lag, once per device;
:func:`duet_jax.data.samples.with_trigger`) are not available for it: the splits have no
``history`` and ``with_trigger`` raises a DataError naming ``authors_text``.

User and item ids may be sparse 64-bit values, as real logs have them. Ids that are dense
enough (largest id at most ``2 * distinct + 1024``) are kept as they are; otherwise users are
renumbered ``0..U-1`` and items ``1..I`` in ascending order of their original ids, so every
table is sized by the number of distinct ids, and the original ids are kept in
``Splits.user_ids`` / ``Splits.item_ids``. An id above the int64 range is a DataError naming
the file, line and value.
"""

from __future__ import annotations

import os

import numpy as np

from duet_jax.data.raw import parse_int
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.errors import DataError
from duet_jax.files import write_text_atomic

FIELDS = "user;target;trigger_seq;click_seq;label"


def _sequence(text: str, source: str, number: int, field: str, seq_len: int) -> list[int]:
    """The ids of one sequence field, fitted to ``seq_len`` (latest items kept, 0-padded)."""
    ids = [parse_int(x, number, source, f"{field} id", 0) for x in text.split(",")] if text else []
    valid = 0
    while valid < len(ids) and ids[valid] != 0:
        valid += 1
    if any(ids[valid:]):
        raise DataError(
            f"{source}, line {number}: {field} is not right-padded: item id "
            f"{next(x for x in ids[valid:] if x)} follows a padding 0"
        )
    kept = ids[max(0, valid - seq_len) : valid]
    return kept + [0] * (seq_len - len(kept))


def _read_columns(path: str, seq_len: int) -> dict[str, np.ndarray]:
    """Every line of ``path`` as int64 columns in the file's own ids (label float32)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected lines {FIELDS})")
    cols: dict[str, list] = {f: [] for f in SampleSet.FIELDS}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {number}: not UTF-8 text ({err})") from None
            if line and not raw.endswith(b"\n"):
                raise DataError(
                    f"{path}, line {number}: the last line has no line ending "
                    f"({line[:80]!r}): the file looks truncated. Restore the complete file "
                    "(if this line is complete, end it with a newline)"
                )
            if not line:
                continue
            fields = line.split(";")
            if len(fields) != 5:
                raise DataError(
                    f"{path}, line {number}: expected 5 fields {FIELDS} separated by ';', "
                    f"found {len(fields)}: {line[:80]!r}"
                )
            user, target, trigger, click, label = fields
            cols["user"].append(parse_int(user, number, path, "user", 0))
            cols["target"].append(parse_int(target, number, path, "target", 1))
            cols["trigger_seq"].append(_sequence(trigger, path, number, "trigger_seq", seq_len))
            cols["click_seq"].append(_sequence(click, path, number, "click_seq", seq_len))
            try:
                value = float(label)
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                raise DataError(f"{path}, line {number}: label {label!r} is not 0 or 1")
            cols["label"].append(value)
    if not cols["label"]:
        raise DataError(f"{path}: no samples (expected lines {FIELDS})")
    out = {f: np.asarray(cols[f], np.int64) for f in ("user", "target")}
    for f in ("click_seq", "trigger_seq"):
        out[f] = np.asarray(cols[f], np.int64).reshape(-1, seq_len)
    out["label"] = np.asarray(cols["label"], np.float32)
    return out


def _is_dense(ids: np.ndarray, low: int) -> bool:
    """Whether ids ``>= low`` can index a table as they are: the largest is at most
    ``2 * distinct + 1024`` (so the table is bounded by the number of distinct ids)."""
    return ids.size == 0 or int(ids.max()) + 1 - low <= 2 * ids.size + 1024


def _densify(parts: list[dict[str, np.ndarray]]
             ) -> tuple[list[SampleSet], int, int, np.ndarray | None, np.ndarray | None]:
    """Int32 :class:`SampleSet` s from int64 columns, one id space across ``parts``:
    ``(sets, num_users, num_items, user_ids, item_ids)``; ``user_ids[u]`` / ``item_ids[i]``
    is the original id of dense user ``u`` / item ``i`` (item 0 = padding), None when the
    ids are kept as they are (module docstring)."""
    users = np.unique(np.concatenate([p["user"] for p in parts]))
    items = np.unique(np.concatenate(
        [np.concatenate([p["target"], p["click_seq"].ravel(), p["trigger_seq"].ravel()])
         for p in parts]))
    items = items[items != 0]  # 0 is padding
    user_ids = item_ids = None
    if _is_dense(users, 0):
        num_users = int(users.max()) + 1
    else:
        user_ids, num_users = users, len(users)
    if _is_dense(items, 1):
        num_items = int(items.max()) if items.size else 0
    else:
        item_ids, num_items = np.r_[np.int64(0), items], len(items)
    sets = []
    for p in parts:
        arrays = dict(p)
        if user_ids is not None:
            arrays["user"] = np.searchsorted(user_ids, p["user"])
        if item_ids is not None:  # item_ids is sorted with 0 first: 0 stays padding
            for f in ("target", "click_seq", "trigger_seq"):
                arrays[f] = np.searchsorted(item_ids, p[f])
        sets.append(SampleSet(**{f: arrays[f] if f == "label" else arrays[f].astype(np.int32)
                                 for f in SampleSet.FIELDS}))
    return sets, num_users, num_items, user_ids, item_ids


def read_samples(path: str, seq_len: int) -> SampleSet:
    """Every line of ``path`` as a :class:`SampleSet` (blank lines are ignored; sparse ids
    renumbered as the module docstring says)."""
    return _densify([_read_columns(path, seq_len)])[0][0]


def format_samples(samples: SampleSet) -> str:
    """``samples`` as text in the authors' format (one line per sample)."""

    def seq(row: np.ndarray) -> str:
        return ",".join(map(str, row.tolist()))

    return "".join(
        f"{u};{t};{seq(trig)};{seq(click)};{int(label)}\n"
        for u, t, trig, click, label in zip(
            samples.user.tolist(),
            samples.target.tolist(),
            samples.trigger_seq,
            samples.click_seq,
            samples.label.tolist(),
            strict=True,
        )
    )


def write_samples(path: str, samples: SampleSet) -> None:
    """Write ``samples`` in the authors' format, atomically."""
    write_text_atomic(path, format_samples(samples))


def _last_groups(samples: SampleSet, frac: float) -> np.ndarray:
    """Mask of each user's last ``max(1, floor(frac * groups))`` sample groups, where a group
    is a run of consecutive rows with the same user and click_seq (a positive and its
    negatives), so a positive never lands in another split than its negatives."""
    new = np.ones(len(samples), bool)
    new[1:] = (samples.user[1:] != samples.user[:-1]) | (
        samples.click_seq[1:] != samples.click_seq[:-1]
    ).any(axis=1)
    group = np.cumsum(new) - 1
    group_user = samples.user[new]
    order = np.argsort(group_user, kind="stable")
    counts = np.bincount(group_user)
    rank = np.empty(len(group_user), np.int64)  # position of each group within its user
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank[order] = np.arange(len(order)) - np.repeat(starts, counts)
    take = np.maximum(1, np.floor(frac * counts).astype(np.int64))
    held = rank >= counts[group_user] - take[group_user]
    return held[group]


def _take(samples: SampleSet, mask: np.ndarray) -> SampleSet:
    return SampleSet(**samples.take(np.flatnonzero(mask)))


def load_splits(
    train_file: str, val_file: str, test_file: str, seq_len: int, val_frac: float = 0.1
) -> Splits:
    """Train/validation/test from the authors' files. With no ``val_file`` (their release
    has train and test only), each user's last ``val_frac`` of train sample groups (file
    order) is held out for validation, so model selection never sees test."""
    names = [train_file, test_file] + ([val_file] if val_file else [])
    sets, num_users, num_items, user_ids, item_ids = _densify(
        [_read_columns(name, seq_len) for name in names])
    train, test = sets[0], sets[1]
    if val_file:
        val = sets[2]
    else:
        held = _last_groups(train, val_frac)
        train, val = _take(train, ~held), _take(train, held)
    info = {"dataset": "authors_text"}  # named by with_trigger's error (no history here)
    if user_ids is not None or item_ids is not None:
        info["renumbered"] = [n for n, ids in (("users", user_ids), ("items", item_ids))
                              if ids is not None]
    return Splits(
        train=train,
        val=val,
        test=test,
        num_users=num_users,
        num_items=num_items,
        info=info,
        user_ids=user_ids,
        item_ids=item_ids,
    )
