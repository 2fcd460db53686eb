"""The head template: which leaves a generated head has, their shapes and dtypes.

A :class:`HeadSpec` is built from any pytree (arrays or ``jax.ShapeDtypeStruct`` leaves),
so the generator serves any head structure without knowing the model behind it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Structure, leaf paths, shapes and dtypes of a head pytree (leaf order = tree order)."""

    treedef: Any
    paths: tuple[str, ...]  # "dense1/kernel", ...
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def from_template(cls, template: Any) -> HeadSpec:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        if not with_paths:
            raise ValueError("head template has no leaves")
        return cls(
            treedef=treedef,
            paths=tuple("/".join(_key_name(k) for k in path) for path, _ in with_paths),
            shapes=tuple(tuple(int(d) for d in leaf.shape) for _, leaf in with_paths),
            dtypes=tuple(np.dtype(leaf.dtype) for _, leaf in with_paths),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def num_values(self) -> int:
        """Generated values per head (2,112 for the SASRec/GRU4Rec head at D = 32)."""
        return sum(self.sizes)

    @property
    def num_bytes(self) -> int:
        return sum(size * dt.itemsize for size, dt in zip(self.sizes, self.dtypes, strict=True))

    def template(self) -> Any:
        """The head as a pytree of ``jax.ShapeDtypeStruct``."""
        leaves = [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)

    def unflatten_leaves(self, leaves: list[Array]) -> Any:
        return jax.tree.unflatten(self.treedef, leaves)

    def flatten(self, tree: Any, batch_ndim: int = 0) -> Array:
        """Concatenate leaves row-major -> ``[*batch, num_values]``."""
        leaves = self.check(tree, batch_ndim)
        batch = leaves[0].shape[:batch_ndim]
        return jnp.concatenate([leaf.reshape(*batch, -1) for leaf in leaves], axis=-1)

    def unflatten(self, flat: Array) -> Any:
        """Inverse of :meth:`flatten`: ``[*batch, num_values]`` -> head with leading ``batch``."""
        if flat.shape[-1] != self.num_values:
            raise ValueError(f"expected last axis {self.num_values}, got shape {flat.shape}")
        batch = flat.shape[:-1]
        splits = np.cumsum(self.sizes)[:-1].tolist()
        parts = jnp.split(flat, splits, axis=-1)
        leaves = [
            p.reshape(*batch, *s).astype(d)
            for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
        ]
        return self.unflatten_leaves(leaves)

    def check(self, tree: Any, batch_ndim: int = 0) -> list[Array]:
        """Leaves of ``tree``, checked against the spec: structure, shapes after ``batch_ndim``
        leading axes (equal across leaves) and dtypes. Raises ValueError naming the leaf."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"head structure {treedef} does not match template {self.treedef}")
        batch = None
        specs = zip(self.paths, leaves, self.shapes, self.dtypes, strict=True)
        for path, leaf, shape, dtype in specs:
            lead, rest = tuple(leaf.shape[:batch_ndim]), tuple(leaf.shape[batch_ndim:])
            if batch is None:
                batch = lead
            if rest != shape or lead != batch or np.dtype(leaf.dtype) != dtype:
                raise ValueError(
                    f"head leaf {path!r}: got shape {tuple(leaf.shape)} {leaf.dtype}, expected "
                    f"{batch + shape} {dtype}"
                )
        return leaves
