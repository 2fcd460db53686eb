"""Delivery formats: how the cloud sends a generated head down to a device, and its bytes.

A head is a pytree (the :class:`~duet_jax.paramspec.HeadSpec` template) with ``batch_ndim``
leading device axes. Each format turns it into a *payload* pytree, what goes over the wire:

- ``float32``: every value as is, 4 bytes per value.
- ``bfloat16``: every value rounded to bfloat16 (round to nearest even), 2 bytes per value;
  relative error at most ``2**-8`` per value (8 significant bits, half an ulp).
- ``int8``: per leaf and per device, symmetric max-abs quantisation:
  ``scale = max|x| / 127``, ``q = round(x / scale)`` in ``[-127, 127]``, sent as 1 byte per
  value plus one float32 ``scale`` per leaf; the device decodes ``q * scale``. The error of
  every value is at most ``scale / 2`` of its leaf (up to float32 rounding of ``x / scale``
  and ``q * scale``, a few ulps); an all-zero leaf has ``scale = 0`` and decodes exactly.

A leaf holding inf or NaN has no finite int8 scale (every value would decode to NaN or 0),
so :func:`encode` refuses it in int8 with a ValueError naming the leaf and device when the
head is concrete; inside ``jit`` (no values to look at), check with :func:`check_finite`
first.

Bytes per device and head (:func:`payload_bytes`) are the leaf sizes times the format's
width, plus ``4 * num_leaves`` for int8's scales; headers and compression are not counted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.paramspec import HeadSpec

Array = jax.Array

FORMATS = ("float32", "bfloat16", "int8")
WIDTH = {"float32": 4, "bfloat16": 2, "int8": 1}  # bytes per head value
SCALE_BYTES = 4  # int8: one float32 scale per leaf
INT8_MAX = 127  # symmetric: -128 is never used, so q and -q are both representable


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"delivery format {fmt!r}: expected one of {FORMATS}")
    return fmt


def payload_bytes(spec: HeadSpec, fmt: str) -> int:
    """Bytes one device receives for one head in ``fmt``."""
    check_format(fmt)
    scales = SCALE_BYTES * len(spec.sizes) if fmt == "int8" else 0
    return spec.num_values * WIDTH[fmt] + scales


def _leaf_axes(leaf: Array, batch_ndim: int) -> tuple[int, ...]:
    return tuple(range(batch_ndim, leaf.ndim))


def _quantize_leaf(leaf: Array, batch_ndim: int) -> dict[str, Array]:
    x = leaf.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=_leaf_axes(x, batch_ndim)) / INT8_MAX  # [*batch]
    wide = scale.reshape(scale.shape + (1,) * (x.ndim - batch_ndim))
    safe = jnp.where(wide > 0, wide, 1.0)  # an all-zero leaf: q = 0, decodes to exactly 0
    q = jnp.clip(jnp.round(x / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return {"q": q, "scale": scale}


def _dequantize_leaf(payload: dict[str, Array], dtype, batch_ndim: int) -> Array:
    q, scale = payload["q"], payload["scale"]
    wide = scale.reshape(scale.shape + (1,) * (q.ndim - batch_ndim))
    return (q.astype(jnp.float32) * wide).astype(dtype)


def check_finite(spec: HeadSpec, head: Any, batch_ndim: int = 1) -> None:
    """Raise ValueError naming the first leaf (by path) and device holding inf or NaN."""
    leaves = spec.check(head, batch_ndim)
    for path, leaf in zip(spec.paths, leaves, strict=True):
        values = np.asarray(leaf)
        bad = ~np.isfinite(values)
        if bad.any():
            where = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]),
                                                           values.shape))
            device = where[:batch_ndim]
            raise ValueError(
                f"int8 delivery: head leaf {path or '<root>'!r} of device {device} holds "
                f"{values[where]} at {where[batch_ndim:]} ({int(bad.sum())} non-finite "
                "values): a non-finite leaf has no int8 scale; fix the generator's output or "
                "deliver it in float32"
            )


def _is_concrete(leaves: list) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def encode(spec: HeadSpec, head: Any, fmt: str, batch_ndim: int = 1) -> Any:
    """Head (``batch_ndim`` leading axes) -> payload pytree in ``fmt`` (jit-able).

    float32/bfloat16: the head's structure with leaves cast; int8: each leaf becomes
    ``{"q": int8 [*batch, *shape], "scale": float32 [*batch]}``.
    """
    leaves = spec.check(head, batch_ndim)
    if check_format(fmt) == "int8":
        if _is_concrete(leaves):
            check_finite(spec, head, batch_ndim)
        out = [_quantize_leaf(leaf, batch_ndim) for leaf in leaves]
    else:
        out = [leaf.astype(jnp.dtype(fmt)) for leaf in leaves]
    return spec.unflatten_leaves(out)


def decode(spec: HeadSpec, payload: Any, fmt: str, batch_ndim: int = 1) -> Any:
    """Payload -> head with the spec's dtypes (what the device swaps in; jit-able)."""
    if check_format(fmt) == "int8":
        # A payload leaf is a {"q", "scale"} dict: flatten only down to those dicts.
        parts = spec.treedef.flatten_up_to(payload)
        leaves = [
            _dequantize_leaf(p, dtype, batch_ndim)
            for p, dtype in zip(parts, spec.dtypes, strict=True)
        ]
    else:
        leaves = [
            jnp.asarray(leaf).astype(dtype)
            for leaf, dtype in zip(spec.treedef.flatten_up_to(payload), spec.dtypes, strict=True)
        ]
    return spec.unflatten_leaves(leaves)


def round_trip(spec: HeadSpec, head: Any, fmt: str, batch_ndim: int = 1) -> Any:
    """``decode(encode(head))``: the head a device ends up with after delivery in ``fmt``."""
    return decode(spec, encode(spec, head, fmt, batch_ndim), fmt, batch_ndim)


def int8_tolerance(spec: HeadSpec, head: Any, batch_ndim: int = 1) -> Any:
    """Per leaf and device, the documented int8 error bound ``scale / 2`` (shape ``[*batch]``)."""
    leaves = spec.check(head, batch_ndim)
    bounds = [
        jnp.max(jnp.abs(leaf.astype(jnp.float32)), axis=_leaf_axes(leaf, batch_ndim))
        / (2 * INT8_MAX)
        for leaf in leaves
    ]
    return spec.unflatten_leaves(bounds)
