"""Fixed-shape batches: every batch has ``batch_size`` rows so ``jit`` compiles once.

The last, partial batch is padded by repeating row 0 with ``weight = 0``; losses and
metrics use ``weight`` so padding never counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from duet_jax.data.samples import SampleSet


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled sample order for one epoch, a pure function of ``(seed, epoch)`` so a
    resumed run replays exactly the batches an uninterrupted run would see."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def padded_batch(samples: SampleSet, index: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Rows ``index`` (at most ``batch_size``) padded to ``batch_size``; adds ``weight [B]``."""
    n = len(index)
    if n > batch_size:
        raise ValueError(f"{n} rows do not fit a batch of {batch_size}")
    full = np.concatenate([index, np.zeros(batch_size - n, index.dtype)])
    batch = samples.take(full)
    batch["weight"] = (np.arange(batch_size) < n).astype(np.float32)
    return batch


def batches(
    samples: SampleSet, batch_size: int, order: np.ndarray | None = None, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Padded batches over ``order`` (default: storage order), from batch number ``start``."""
    order = np.arange(len(samples)) if order is None else order
    for b in range(start, num_batches(len(order), batch_size)):
        yield padded_batch(samples, order[b * batch_size : (b + 1) * batch_size], batch_size)


def bucket_size(n: int, min_bucket: int, max_bucket: int | None = None, multiple: int = 1) -> int:
    """Smallest power of two >= ``n`` within ``[min_bucket, max_bucket]``, rounded up to a
    multiple of ``multiple`` (the number of shards). ``n`` above ``max_bucket`` is split by
    the caller."""
    size = max(min_bucket, 1 << max(n - 1, 0).bit_length())
    if max_bucket is not None:
        size = min(size, max_bucket)
    return -(-size // multiple) * multiple
