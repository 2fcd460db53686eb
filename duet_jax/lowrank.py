"""Low-rank generated kernels (APG-style): ``W = U C V`` with a small generated core ``C``.

A generator in low-rank mode writes only the core ``C [k, k]`` of a matrix leaf per device;
``U [in, k]`` and ``V [k, out]`` are shared by all devices (ordinary trained parameters).
The kernel travels as a :class:`LowRankKernel` node in the head pytree and
:func:`duet_jax.models.layers.dense` applies it as ``((x @ U) @ C) @ V``: the full
``[in, out]`` weight is never formed. :func:`materialize` forms it when a caller needs the
head in the template's exact structure (delivery to a device, comparisons).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class LowRankKernel:
    """``kernel = u @ core @ v``.

    ``u [in, k]`` and ``v [k, out]`` are shared; ``core`` is ``[k, k]`` (one kernel) or
    ``[B, k, k]`` (one per example/device). ``u``/``v`` may also carry that leading ``B``.
    """

    u: Array
    core: Array
    v: Array

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the materialised kernel (``[*batch, in, out]``)."""
        batch = self.core.shape[:-2]
        return (*batch, self.u.shape[-2], self.v.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def apply(self, x: Array) -> Array:
        """``x @ kernel`` without forming the kernel.

        Shared core: ``x [..., in]`` -> ``[..., out]``. Per-example core ``[B, k, k]``:
        ``x [B, ..., in]`` -> ``[B, ..., out]``.
        """
        y = _batched_matmul(x, self.u)
        y = _batched_matmul(y, self.core)
        return _batched_matmul(y, self.v)


def _batched_matmul(x: Array, w: Array) -> Array:
    """``x @ w`` for ``w [i, o]`` (shared) or ``w [B, i, o]`` with ``x [B, ..., i]``."""
    if w.ndim == 2:
        return x @ w
    return jnp.einsum("b...i,bio->b...o", x, w)


def is_low_rank(node: Any) -> bool:
    return isinstance(node, LowRankKernel)


def materialize(head: Any) -> Any:
    """Replace every :class:`LowRankKernel` in ``head`` by its full kernel ``u @ core @ v``."""

    def full(node):
        if is_low_rank(node):
            return jnp.matmul(jnp.matmul(node.u, node.core), node.v)
        return node

    return jax.tree.map(full, head, is_leaf=is_low_rank)
