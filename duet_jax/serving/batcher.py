"""Dynamic batching: concurrent requests queued and answered in batched generation calls.

A worker task takes the oldest request, then keeps taking queued ones until the batch holds
``max_batch`` rows or ``max_wait_s`` has passed since it started the batch, and runs it:
one call per (upload kind, delivery format) present, on a single worker thread (so the
event loop keeps answering while XLA runs, and generations never overlap), or with
``inline=True`` on the event loop's own thread. The queue is
bounded: :meth:`DynamicBatcher.submit` raises :class:`QueueFull` instead of letting it grow.
:meth:`DynamicBatcher.close` refuses new requests and answers every queued one before it
returns (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

RunFn = Callable[[str, str, np.ndarray], tuple[list, float]]  # (kind, fmt, x) -> leaves, s


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests; the client should retry later."""


class Closed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclasses.dataclass
class _Item:
    kind: str
    fmt: str
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How a request was answered: its batched call's seconds and rows, its wait."""

    generation_s: float
    batch_rows: int
    queue_s: float


class DynamicBatcher:
    """Batches requests for ``run(kind, fmt, x [n, ...]) -> (leaves [n, ...], seconds)``.

    ``on_batch(rows, seconds)`` is called after every call (metrics).
    """

    def __init__(self, run: RunFn, max_batch: int = 64, max_wait_s: float = 0.002,
                 max_queue: int = 256, on_batch: Callable[[int, float], None] | None = None,
                 inline: bool = False):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        # inline: generate on the event loop's thread (it pauses meanwhile). Saves two thread
        # hand-offs per batch, which on a few busy cores cost more than the pause.
        self.inline = inline
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._carry: _Item | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "duet-generate")
        self.in_flight = 0  # requests submitted and not yet answered

    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return (self._queue.qsize() if self._queue else 0) + (self._carry is not None)

    def start(self) -> None:
        self._queue = asyncio.Queue()  # bounded by submit(), so close() can always enqueue
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def submit(self, kind: str, fmt: str, x: np.ndarray) -> tuple[list, BatchInfo]:
        if self._closing or self._queue is None:
            raise Closed("the server is shutting down")
        if self.depth() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests queued")
        item = _Item(kind, fmt, x, asyncio.get_running_loop().create_future(),
                     time.perf_counter())
        self.in_flight += 1
        try:
            self._queue.put_nowait(item)
            return await item.future
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        """Take no new requests; answer the queued ones, then stop the worker."""
        if self._closing or self._queue is None:
            return
        self._closing = True
        self._queue.put_nowait(None)  # wakes the worker once the queue is empty
        await self._task
        self._executor.shutdown(wait=True)

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else ...
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return ...  # nothing came in time

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._next(None)
            if first is None:
                return
            batch, rows = [first], len(first.x)
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is ...:
                    break
                if item is None:  # closing: finish this batch, then stop
                    stop = True
                    break
                if rows + len(item.x) > self.max_batch:
                    self._carry = item  # starts the next batch
                    break
                batch.append(item)
                rows += len(item.x)
            await self._run_batch(loop, batch)
            if stop and self.depth() == 0:
                return
            if stop:  # a carried item is left: answer it, then stop
                self._queue.put_nowait(None)
                stop = False

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        groups: dict[tuple[str, str], list[_Item]] = {}
        for item in batch:
            groups.setdefault((item.kind, item.fmt), []).append(item)
        for (kind, fmt), items in groups.items():
            x = np.concatenate([i.x for i in items]) if len(items) > 1 else items[0].x
            started = time.perf_counter()
            try:
                if self.inline:
                    leaves, seconds = self.run(kind, fmt, x)
                else:
                    leaves, seconds = await loop.run_in_executor(
                        self._executor, self.run, kind, fmt, x)
            except Exception as err:  # answered as 500 to these requests; the server lives
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(err)
                continue
            if self.on_batch is not None:
                self.on_batch(len(x), seconds)
            start = 0
            for i in items:
                n = len(i.x)
                part = [leaf_rows(leaf, start, n) for leaf in leaves]
                info = BatchInfo(seconds, len(x), started - i.enqueued)
                if not i.future.done():  # a client that went away has cancelled it
                    i.future.set_result((part, info))
                start += n


def leaf_rows(leaf: Any, start: int, n: int) -> Any:
    """Rows ``start:start + n`` of one payload leaf: an array, or an int8 ``(q, scale)`` pair."""
    if isinstance(leaf, tuple):
        return tuple(x[start:start + n] for x in leaf)
    return leaf[start:start + n]
