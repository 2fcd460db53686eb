"""Orbax checkpoints of a training run: a pytree of arrays plus a small JSON record.

Restores take an abstract target (shapes, dtypes, tree structure), so optax states come back
as the same named tuples rather than plain dicts. Saves are synchronous and orbax writes
each step to a temporary directory that it renames when complete, so a run killed mid-save
leaves no checkpoint a later run would pick up.

A step that cannot be read back (files damaged or deleted after it was written) is moved
aside to ``<directory>.corrupt/<step>`` with a warning, and the newest intact step is
restored instead; with no intact step left, :class:`~duet_jax.errors.RunError` says so in one
paragraph naming the directory. A save that runs out of disk space is a ``RunError`` naming
the directory; the steps saved before it stay intact.

When a read of a damaged step fails, orbax's other reads still in flight finish on
tensorstore's threads after orbax has closed the asyncio loop that awaited them; each then
raises "Event loop is closed" into ``sys.unraisablehook``, which would print a traceback
around the one-line error. A :class:`Checkpointer` therefore installs, once per process, a
filter that drops exactly those (:func:`ignore_late_callbacks_of_closed_loops`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp

from duet_jax.errors import RunError
from duet_jax.files import DISK_FULL, disk_full_error


def _disk_full(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``err`` (orbax may wrap it), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def _reason(err: BaseException) -> str:
    """The first line of an orbax error, short enough for a log line."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def is_late_callback_of_closed_loop(exc: BaseException | None) -> bool:
    """Whether ``exc`` is asyncio refusing a callback because its loop is closed: a
    ``RuntimeError("Event loop is closed")`` raised inside ``call_soon_threadsafe``. Such a
    callback carries a result that nobody awaits any more, so dropping it loses nothing."""
    return (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and any(frame.name == "call_soon_threadsafe"
                for frame in traceback.extract_tb(exc.__traceback__))
    )


_FILTER_LOCK = threading.Lock()


def ignore_late_callbacks_of_closed_loops() -> None:
    """Wrap ``sys.unraisablehook`` (once per process) so that it drops the exceptions
    :func:`is_late_callback_of_closed_loop` recognises, logged at debug level, and hands
    every other one to the hook it wraps. The hook is process-wide by nature: the late
    callbacks arrive on other threads, after the failed read has returned."""
    with _FILTER_LOCK:
        wrapped = sys.unraisablehook
        if getattr(wrapped, "_duet_drops_late_callbacks", False):
            return

        def hook(unraisable):
            if is_late_callback_of_closed_loop(unraisable.exc_value):
                logging.debug("dropped a late callback of a closed asyncio loop (a failed "
                              "checkpoint restore's read finishing)")
                return
            wrapped(unraisable)

        hook._duet_drops_late_callbacks = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook


def _listing(failures: list[tuple[int, str]]) -> str:
    return "; ".join(f"step {step}: {reason}" for step, reason in failures)


class Checkpointer:
    """Save/restore ``(state pytree, meta dict)`` by step under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        ignore_late_callbacks_of_closed_loops()
        self.directory = os.path.abspath(directory)
        self._max_to_keep = max_to_keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._max_to_keep, create=True, enable_async_checkpointing=False
            ),
            # handlers, not just names, so item_metadata() can read a step's metadata
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as err:
            full = _disk_full(err)
            if full is None:
                raise
            raise disk_full_error(os.path.join(self.directory, str(step)), full) from None

    def _restore_step(self, abstract: Any, step: int) -> tuple[Any, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        meta = restored.meta
        if not isinstance(meta, dict):
            raise ValueError(f"the step's meta record is {type(meta).__name__}, not a dict")
        return restored.state, dict(meta)

    def state_metadata(self, step: int) -> Any:
        """The tree of the ``state`` item saved at ``step``, each leaf orbax's metadata
        (``.shape``, ``.dtype``); no array data is read. ``ValueError`` when the step's
        metadata cannot be read, naming orbax's reason where it gave one."""
        what = f"step {step} has no readable metadata of its state"
        try:
            meta = self._manager.item_metadata(step)
        except Exception as err:  # orbax raises many types for damaged files
            raise ValueError(f"{what} ({_reason(err)})") from err
        state = None if meta is None else meta.get("state")
        tree = getattr(state, "tree", state)
        if tree is None:
            raise ValueError(what)
        return tree

    def _set_aside(self, step: int) -> str:
        """Move an unreadable step out of the directory orbax scans; returns where to."""
        aside = os.path.join(self.directory + ".corrupt", str(step))
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        return aside

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``step`` (default: the newest intact one) into the structure of
        ``target``. Without ``step``, unreadable newer steps are moved aside with a warning;
        :class:`RunError` when none is readable."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        if step is not None:
            return self._restore_step(abstract, step)
        failures = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            try:
                out = self._restore_step(abstract, candidate)
            except Exception as err:  # orbax raises many types for damaged files
                failures.append((candidate, _reason(err)))
                continue
            if failures:
                self._manager.close()
                moved = [self._set_aside(bad) for bad, _ in failures]
                self._manager = self._open()
                logging.warning(
                    "checkpoints in %s: falling back to step %d, the newest readable one; "
                    "unreadable newer steps moved to %s (%s)", self.directory, candidate,
                    os.path.dirname(moved[0]), _listing(failures))
            return out
        raise RunError(
            f"{self.directory}: no checkpoint step can be read ({_listing(failures)}). The "
            "files are damaged or were changed after they were written. Move this directory "
            "away (or delete it) and run the same command again: training then starts from "
            "scratch and, being deterministic, reaches the same result"
        )

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
