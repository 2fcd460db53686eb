"""Identity-checked stores and the digests they key on: the one place "reuse a stored
result only if it was made from the same inputs" lives.

Every store in the project works the same way: a result is written together with its
*identity* (a JSON-able dict of everything it was built from: config fields, data
fingerprints, parameter digests) and is reused only when a later request brings the same
identity. Files are written atomically (:mod:`duet_jax.files`), so a killed run never leaves
a record a later run would trust.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "result.json")
>>> save_record(path, {"lr": 0.1}, {"auc": 0.8})
>>> load_record(path, {"lr": 0.1})
{'auc': 0.8}
>>> load_record(path, {"lr": 0.2}) is None
True

Users of this module: the training run's ``run_config.json`` (:mod:`duet_jax.training`),
fine-tuning's ``result.json`` and the paper table's cells (``experiments/``), and the
prepared-sample cache (:mod:`duet_jax.data.cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from duet_jax import files


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from stored JSON (tuples -> lists, NaN -> None), so an
    identity built in memory compares equal to the same identity loaded from disk."""
    return json.loads(files.dumps(obj))


def json_digest(obj: Any) -> str:
    """sha256 (hex) of ``obj``'s canonical, key-sorted JSON."""
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def arrays_digest(tree: Any) -> str:
    """sha256 (hex) of a pytree's array leaves: shapes, dtypes and bytes, in tree order
    (e.g. the Base parameters a dependent run starts from)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def read_json(path: str) -> dict | None:
    """The JSON object stored at ``path``, or None when there is no file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def with_defaults(stored: Any, defaults: Any) -> Any:
    """``stored`` with every key it lacks (at any depth) taken from ``defaults``.

    A field added to the code later, with a default that reproduces the old behaviour, is
    absent from identities written before it existed; completing them with the defaults
    lets those records be reused, while a record made with another value still differs.

    >>> with_defaults({"a": 1, "b": {"c": 2}}, {"a": 0, "b": {"c": 0, "d": 3}, "e": 4})
    {'a': 1, 'b': {'c': 2, 'd': 3}, 'e': 4}
    """
    if not (isinstance(stored, dict) and isinstance(defaults, dict)):
        return stored
    out = {k: with_defaults(v, defaults.get(k)) for k, v in stored.items()}
    out.update({k: v for k, v in defaults.items() if k not in stored})
    return out


def load_record(path: str, identity: dict, key: str = "result",
                defaults: dict | None = None) -> Any | None:
    """The payload stored under ``key`` at ``path`` if it was written for ``identity``;
    None when absent or made from other inputs (the caller rebuilds it).

    ``defaults``: an identity built from the code's default settings; keys the stored
    identity lacks are taken from it before comparing (see :func:`with_defaults`)."""
    stored = read_json(path)
    if stored is None:
        return None
    old = stored.get("identity")
    if defaults is not None:
        old = with_defaults(old, canonical(defaults))
    if old != canonical(identity):
        return None
    return stored.get(key)


def save_record(path: str, identity: dict, payload: Any, key: str = "result",
                **extra: Any) -> None:
    """Write ``{"identity", key: payload, **extra}`` to ``path`` atomically."""
    files.write_text_atomic(path, files.dumps({"identity": canonical(identity), key: payload,
                                               **extra}))


def cached_array(path: str, identity: dict, compute: Callable[[], Any]) -> np.ndarray:
    """The array stored at ``path`` (``.npy``) if it was made for ``identity`` and is intact;
    else ``compute()``, stored there before it is returned. A record beside it
    (``path + ".json"``, written last) holds the identity and the array's digest, so a file
    from other inputs, a damaged one or one whose record is missing is recomputed, never
    reused. Long jobs keep their finished parts this way (fine-tuning: one learning rate's
    validation logits), so an interrupted job resumes after the last finished part."""
    record = load_record(path + ".json", identity)
    if record is not None and os.path.isfile(path):
        try:
            array = np.load(path)
        except (OSError, ValueError):  # damaged: recompute
            array = None
        if array is not None and arrays_digest(array) == record.get("sha256"):
            return array
    array = np.asarray(compute())
    with files.atomic_file(path, "wb") as f:
        np.save(f, array)
    save_record(path + ".json", identity, {"sha256": arrays_digest(array)})
    return array


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted.path, old, new)`` for each leaf where two JSON-like dicts differ; a key
    present on one side only counts as a difference with ``None`` on the other."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix, old, new)]
