"""Low-rank generated kernels (APG-style): ``W = U C V`` with a small generated core ``C``.

A generator in low-rank mode writes only the core ``C [k, k]`` of a matrix leaf per device;
``U [in, k]`` and ``V [k, out]`` are shared by all devices (ordinary trained parameters).
The kernel travels as a :class:`LowRankKernel` node in the head pytree. It applies itself
(:meth:`LowRankKernel.matmul`, as ``((x @ U) @ C) @ V``, never forming the ``[in, out]``
weight), which is all :func:`duet_jax.models.layers.dense` asks of a kernel that is not a
plain array (:class:`duet_jax.models.layers.KernelOperator`): the layers need not know the
kernel is low-rank. :func:`materialize` forms the full weight when a caller needs the head
in the template's exact structure (delivery to a device, comparisons).
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

    >>> k = LowRankKernel(u=jnp.ones((3, 1)), core=jnp.full((4, 1, 1), 2.0), v=jnp.ones((1, 2)))
    >>> k.shape, k.matmul(jnp.ones((4, 3))).shape
    ((4, 3, 2), (4, 2))
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

    def matmul(self, x: Array) -> Array:
        """``x @ kernel`` without forming the kernel.

        Shared core: ``x [..., in]`` -> ``[..., out]``. Per-example core ``[B, k, k]``:
        ``x [B, ..., in]`` -> ``[B, ..., out]``, example ``b`` through its own kernel.
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
