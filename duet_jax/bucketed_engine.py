"""The part of a generation engine that does not depend on where its functions come from.

Both engines, the one built from a trained run (:class:`duet_jax.serving.engine.Engine`)
and the one loaded from an exported directory (:class:`duet_jax.export.ExportedEngine`),
pad a request's rows to a few batch buckets, so jit compiles one program per bucket, and run
one generation at a time. No web framework is imported here, so the exporter needs none.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jax
import numpy as np

from duet_jax.data.batching import bucket_size


def buckets(max_batch: int, min_bucket: int = 1) -> list[int]:
    """The padded batch sizes the server compiles: powers of two up to ``max_batch``."""
    out, size = [], bucket_size(1, min_bucket, max_batch)
    while True:
        out.append(size)
        if size >= max_batch:
            return out
        size = bucket_size(size + 1, min_bucket, max_batch)



class BucketedEngine:
    """What every engine shares: one jitted function per ``(kind, fmt)`` in ``_fns``, inputs
    padded (repeating row 0) to a power-of-two bucket in ``[min_bucket, max_batch]`` so jit
    compiles one program per bucket, calls serialised by a lock (one generation at a time
    uses all cores). Subclasses set ``max_batch``, ``min_bucket``, ``seq_len``, ``z_dim``,
    ``_fns`` and ``_lock``, and turn :meth:`_call`'s outputs into payload leaves."""

    max_batch: int
    min_bucket: int
    seq_len: int
    z_dim: int
    _fns: dict
    _lock: threading.Lock

    def buckets(self) -> list[int]:
        return buckets(self.max_batch, self.min_bucket)

    def example(self, kind: str, n: int) -> np.ndarray:
        """A valid input of ``n`` rows (for warm-up)."""
        if kind == "ids":
            return np.ones((n, self.seq_len), np.int32)
        return np.zeros((n, self.z_dim), np.float32)

    def warm_up(self, sizes: list[int] | None = None) -> float:
        """Compile and run every (kind, fmt, bucket); -> seconds taken."""
        start = time.perf_counter()
        for kind, fmt in self._fns:
            for size in sizes or self.buckets():
                self.run(kind, fmt, self.example(kind, size))
        return time.perf_counter() - start

    def run(self, kind: str, fmt: str, x: np.ndarray) -> tuple[list, float]:
        raise NotImplementedError

    def _call(self, kind: str, fmt: str, x: np.ndarray, *args: Any) -> tuple[Any, int, float]:
        """``fns[kind, fmt](*args, x padded to its bucket)`` -> (outputs with the padded
        rows, n, seconds of the call with its host transfer)."""
        n = len(x)
        size = bucket_size(n, self.min_bucket, self.max_batch)
        if n < size:
            x = np.concatenate([x, np.repeat(x[:1], size - n, axis=0)])
        with self._lock:
            start = time.perf_counter()
            out = jax.block_until_ready(self._fns[kind, fmt](*args, x))
            seconds = time.perf_counter() - start
        return out, n, seconds
