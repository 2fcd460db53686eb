"""The head template: which leaves a generated head has, their shapes and dtypes.

A *head template* is any pytree (nested dicts, lists, tuples) whose leaves are arrays or
``jax.ShapeDtypeStruct``; only the leaves' shapes and dtypes matter. A :class:`HeadSpec`
is built from one (:meth:`HeadSpec.of` converts a template, and passes a spec through), so
the generator serves any head structure without knowing the model behind it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
HeadTemplate = Any  # a pytree of arrays / jax.ShapeDtypeStruct leaves


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Structure, leaf paths, shapes and dtypes of a head pytree (leaf order = tree order).

    Most users never build one: the generator takes a template and converts it. It also
    flattens heads to ``[*batch, num_values]`` and back (delivery, fleet statistics).

    >>> head = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
    >>> spec = HeadSpec.of(head)
    >>> spec.paths, spec.flatten(head).shape
    (('dense/bias', 'dense/kernel'), (15,))
    """

    treedef: Any
    paths: tuple[str, ...]  # "dense1/kernel", ...
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def from_template(cls, template: HeadTemplate) -> HeadSpec:
        """The spec of ``template``; raises ValueError naming any leaf without shape/dtype.

        >>> spec = HeadSpec.from_template({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
        >>> spec.paths, spec.shapes, spec.num_values
        (('b', 'w'), ((2,), (3, 2)), 8)
        """
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        if not with_paths:
            raise ValueError(f"head template has no leaves: {template!r}")
        paths = tuple("/".join(_key_name(k) for k in path) for path, _ in with_paths)
        for path, (_, leaf) in zip(paths, with_paths, strict=True):
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise ValueError(
                    f"head template leaf {path or '<root>'!r} is a {type(leaf).__name__} "
                    f"({leaf!r}): expected an array or jax.ShapeDtypeStruct (a leaf with "
                    ".shape and .dtype)"
                )
        return cls(
            treedef=treedef,
            paths=paths,
            shapes=tuple(tuple(int(d) for d in leaf.shape) for _, leaf in with_paths),
            dtypes=tuple(np.dtype(leaf.dtype) for _, leaf in with_paths),
        )

    @classmethod
    def of(cls, spec_or_template: HeadSpec | HeadTemplate) -> HeadSpec:
        """``spec_or_template`` if it is a :class:`HeadSpec`, else the spec of that template:
        the one place a template given where a spec is expected gets converted."""
        if isinstance(spec_or_template, HeadSpec):
            return spec_or_template
        return cls.from_template(spec_or_template)

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
