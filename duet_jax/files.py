"""Files that are never half-written: write to a unique temp file beside the target, fsync,
then rename over it. JSON is strict (NaN/inf become null), so any parser reads it.

A full disk (``ENOSPC``, or a quota: ``EDQUOT``) becomes a :class:`~duet_jax.errors.RunError`
naming the path, and the old file is left as it was. :func:`workdir_lock` keeps two
processes out of one directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from duet_jax.errors import RunError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOCK_FILE = ".lock"


def disk_full_error(path: str | os.PathLike, err: OSError) -> RunError:
    """The message for a write to ``path`` that ran out of space."""
    return RunError(
        f"{os.fspath(path)}: no space left on the device ({os.strerror(err.errno)}) while "
        "writing it. Free space there (or point the run elsewhere) and run the same command "
        "again: files are written whole or not at all, and the last complete checkpoint "
        "stays usable"
    )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a unique temp file beside it, fsynced and renamed
    over ``path`` when the block ends, deleted if the block raises."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise disk_full_error(path, err) from None
        raise


@contextlib.contextmanager
def workdir_lock(directory: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``directory/.lock`` for the block.

    A second process (or a second open in this one) asking for the same directory raises
    :class:`RunError` naming the directory and the holder's pid, or with ``wait`` blocks until
    the first lets go. The lock dies with its process, so a killed run never leaves the
    directory locked (the file itself stays, harmless)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(
                f"{directory} is in use by another run (process {holder} holds {path}). Wait "
                "for it to finish, or give this run another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new, never part."""
    with atomic_file(path) as f:
        f.write(text)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, sort_keys: bool = False) -> str:
    """Strict, indented JSON text with a trailing newline."""
    return json.dumps(strict_json(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
