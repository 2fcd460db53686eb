"""The stabiliser (SWA / MetaStabilizer): M candidate outputs of a decoder, mixed by their
self-similarity so that one erratic candidate cannot swing the generated parameters.

For one generated tensor, the M candidates ``c [M, R, C]`` (a matrix leaf's ``R`` rows; a
vector leaf is one row) are compared row by row:
``s[m, j, r] = <c[m, r], c[j, r]> / sqrt(C)``. Each candidate ``m`` attends over the others
with weights ``a[m, :, r]`` and the result is the mean over ``m``:
``out[r] = mean_m sum_j a[m, j, r] c[j, r]``.

- ``softmax_over="candidates"`` (default, the paper's intent): ``a = softmax_j(s)``, so each
  row of the output is a convex combination of the candidates' rows, weighted towards the
  candidates that agree with the others. With ``M = 1`` the output is the candidate itself.
- ``softmax_over="rows"`` (what the authors' ``hyper_attention`` code does): the softmax runs
  over the ``R`` rows instead, ``a = softmax_r(s)``. The weights then sum to one down each
  column of rows rather than across candidates, so the output is *not* a mixture of the
  candidates (its scale shrinks with ``R`` and grows with ``M``); offered to reproduce that code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

SOFTMAX_OVER = ("candidates", "rows")


def stabilise(candidates: Array, softmax_over: str = "candidates") -> Array:
    """``candidates [M, *shape]`` -> ``[*shape]`` (see the module docstring)."""
    if softmax_over not in SOFTMAX_OVER:
        raise ValueError(f"softmax_over={softmax_over!r}: expected one of {SOFTMAX_OVER}")
    num, shape = candidates.shape[0], candidates.shape[1:]
    rows = shape[0] if len(shape) >= 2 else 1
    c = candidates.reshape(num, rows, -1)
    scores = jnp.einsum("mrc,jrc->mjr", c, c) / math.sqrt(c.shape[-1])  # [M, M, R]
    axis = 1 if softmax_over == "candidates" else 2
    weights = jax.nn.softmax(scores, axis=axis).mean(axis=0)  # [M (j), R]: mean over m
    return jnp.einsum("jr,jrc->rc", weights, c).reshape(shape)
