"""Prepared samples cached on disk, keyed by everything that shaped them.

A second run with the same dataset, protocol, sample config, seed and raw data (the
key holds the raw files' size and sha256, so an edited or replaced file is never served
from an older cache) loads the arrays instead of rebuilding them: every split's arrays and
row positions, and the users' full sequences (``Splits.history``) that
:func:`duet_jax.data.samples.with_trigger` reads.
The file is written under a temporary name and renamed, so an interrupted write never
leaves a cache a later run would trust.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from duet_jax.cache import canonical, json_digest
from duet_jax.data.samples import SPLITS, History, SampleSet, Splits
from duet_jax.files import atomic_file

FORMAT = 2  # bump when the cached layout changes (2: row positions and history)


def cache_path(cache_dir: str, key: dict[str, Any]) -> str:
    digest = json_digest({"format": FORMAT, **key})
    return os.path.join(cache_dir, f"{key.get('dataset', 'data')}-{digest[:16]}.npz")


def save(path: str, splits: Splits, key: dict[str, Any]) -> None:
    arrays = {}
    for name in SPLITS:
        samples = getattr(splits, name)
        arrays.update({f"{name}.{field}": a for field, a in samples.arrays().items()})
        if samples.position is not None:
            arrays[f"{name}.position"] = samples.position
    history = splits.history
    if history is not None:
        arrays.update({f"history.{f}": getattr(history, f) for f in History.ARRAYS})
    for name in ("user_ids", "item_ids"):
        if getattr(splits, name) is not None:
            arrays[name] = getattr(splits, name)
    meta = {
        "format": FORMAT,
        "key": canonical(key),
        "num_users": splits.num_users,
        "num_items": splits.num_items,
        "info": splits.info,
        "history": None
        if history is None
        else {"min_history": history.min_history, "sync_every": history.sync_every},
    }
    with atomic_file(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load(path: str, key: dict[str, Any]) -> Splits | None:
    """The cached splits, or None if ``path`` is missing or was made for another key."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT or meta.get("key") != canonical(key):
            return None
        parts = {
            name: SampleSet(
                **{f: z[f"{name}.{f}"] for f in SampleSet.FIELDS},
                position=z[f"{name}.position"] if f"{name}.position" in z.files else None,
            )
            for name in SPLITS
        }
        history = None
        if meta["history"] is not None:
            history = History(**{f: z[f"history.{f}"] for f in History.ARRAYS}, **meta["history"])
        ids = {name: z[name] if name in z.files else None for name in ("user_ids", "item_ids")}
    return Splits(
        **parts,
        num_users=meta["num_users"],
        num_items=meta["num_items"],
        info=meta["info"],
        history=history,
        **ids,
    )


def cached_splits(
    cache_dir: str | None, key: dict[str, Any], build: Callable[[], Splits]
) -> Splits:
    """``build()``, or its cached result from ``cache_dir`` (no caching when None)."""
    if cache_dir is None:
        return build()
    path = cache_path(cache_dir, key)
    splits = load(path, key)
    if splits is None:
        splits = build()
        save(path, splits, key)
    return splits
