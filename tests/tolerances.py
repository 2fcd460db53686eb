"""Float tolerances for the tests, derived from float32 rounding-error analysis, never fitted.

Why tests need them: XLA sums in an order that depends on the CPU's vector width (AVX2 vs
AVX-512), on the batch shape (a vmapped group vs one device, a padded bucket) and on fusion.
Every order is right to float32 rounding, but two orders differ from each other and from a
float64 reference. These helpers bound that difference; a real bug (a wrong row, a missing
term, cross-talk between devices) is orders of magnitude larger.

The analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-3):

- one float32 operation rounds with relative error at most ``U = 2**-24``;
- a value reached through at most ``n`` roundings in sequence (a sum or dot product of ``n``
  terms, in any order, counts ``n``) is within ``gamma(n) * A`` of the exact value, where
  ``gamma(n) = n U / (1 - n U)`` and ``A`` is the same computation on absolute values:
  ``sum |x_i|`` for a sum, ``sum |a_i b_i|`` for a dot product, ``|A| |B| |C|`` for a matrix
  product chain (to first order);
- two float32 evaluations in different orders are each that close to the exact value, so
  within ``2 gamma(n) A`` of each other (:func:`f32_pair_atol`).

Through a network the rounding errors of its layers add up (to first order) along the
longest path from input to output, carried by layers that are about 1-Lipschitz here (tanh,
sigmoid, ReLU, softmax, layer norm of unit-variance rows): ``n`` is the sum of the fan-ins
on that path (:func:`path_roundings`, :func:`model_roundings`). ``SAFETY = 2`` covers what
this leaves out: XLA's exp/tanh/rsqrt are within a few ulp rather than half of one, and a
layer norm of a low-variance row amplifies a little.
"""

from __future__ import annotations

import numpy as np

U = 2.0**-24  # float32 unit roundoff (round to nearest): one rounding's relative error
U64 = 2.0**-53  # float64 unit roundoff
BF16_ULP = 2.0**-7  # bfloat16 (8 significant bits): spacing relative to the value, at most
SAFETY = 2.0
ELEMENTWISE = 4  # roundings a layer adds beside its sum: bias add, activation (a few ulp)
# An upper estimate of the largest sum of |terms| a layer of the tests' tiny models forms
# (D = 8-16): activations are bounded by tanh/sigmoid (1) or layer norm (sqrt(D) < 4), or are
# N(0, 1) test inputs; a weight averages |w| ~ 0.3 (xavier bound sqrt(6 / 2D) < 0.7, plus the
# tests' 0.1-0.3 perturbations); fan-ins are 4-32. So a sum is ~ fan-in x 0.3 x |activation|
# < 16. (Measured on the device-model tests' float64 references: at most 7.2.)
MODEL_SCALE = 16.0


def gamma(n: int, unit: float = U) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error after ``n`` roundings."""
    if n * unit >= 1:
        raise ValueError(f"{n} roundings: the first-order bound no longer holds")
    return n * unit / (1 - n * unit)


def f32_atol(roundings: int, scale, safety: float = SAFETY):
    """|float32 result - exact| for ``roundings`` roundings on sums of |terms| ``<= scale``
    (a float or an array: the same computation on absolute values, elementwise)."""
    return safety * gamma(roundings) * np.asarray(scale, np.float64)


def f64_atol(roundings: int, scale=1.0, safety: float = SAFETY):
    """|float64 result - exact|: host-side numpy metrics, sklearn."""
    return safety * gamma(roundings, U64) * np.asarray(scale, np.float64)


def f32_pair_atol(roundings: int, scale, safety: float = SAFETY):
    """|one float32 evaluation - another| (another summation order: CPU, batch shape)."""
    return 2 * f32_atol(roundings, scale, safety)


def matmul_atol(n: int, *factors, bias=None, pair: bool = False, safety: float = SAFETY):
    """Elementwise bound for ``A @ B @ ... (+ bias)`` in float32 vs exact (``pair``: vs
    another float32 evaluation), ``n`` = the total inner length of the chain plus one per
    input rounded to float32: ``gamma(n) (|A| |B| ... + |bias|)`` to first order."""
    abs_value = np.abs(np.asarray(factors[0], np.float64))
    for f in factors[1:]:
        abs_value = abs_value @ np.abs(np.asarray(f, np.float64))
    if bias is not None:
        abs_value = abs_value + np.abs(np.asarray(bias, np.float64))
    return (f32_pair_atol if pair else f32_atol)(n, abs_value, safety)


def path_roundings(*fan_ins: int) -> int:
    """Roundings along a path of layers with these fan-ins (each also adds ELEMENTWISE)."""
    return sum(n + ELEMENTWISE for n in fan_ins)


def model_roundings(name: str, d: int, seq_len: int, num_heads: int = 2, ffn_mult: int = 4,
                    din_hidden: tuple[int, ...] = ()) -> int:
    """Roundings on the longest input-to-logit path of a device model (``apply``)."""
    if name == "sasrec":  # E + P, input proj, q, q.k, softmax sum, attention sum, out proj,
        # layer norm (mean, variance), ffn1, ffn2, layer norm, head dense1, dense2, <u, t>
        return path_roundings(1, d, d, d // num_heads, seq_len, seq_len, d, 2 * d, d,
                              ffn_mult * d, 2 * d, d, d, d)
    if name == "gru4rec":  # input proj, one GRU step per position (x W + h W, three gates
        # whose errors the sigmoid/tanh gates carry contracted), head dense1, dense2, <u, t>
        return path_roundings(d, *(2 * d + 2 * ELEMENTWISE,) * seq_len, d, d, d)
    if name == "din":  # input proj, key proj, q.k, softmax sum, attention sum, MLP head
        return path_roundings(d, d, d, seq_len, seq_len, 2 * d, *din_hidden)
    raise ValueError(f"no rounding count for model {name!r}")


def generator_roundings(seq_len: int, in_dim: int, hidden: int, z_dim: int,
                        embed: tuple[int, ...] = (), stabiliser: tuple[int, int] = (0, 0)) -> int:
    """Roundings on the longest path of the parameter generator: the device model's
    sequence embedding (its fan-ins ``embed``), a GRU step per position, ``Dense(hidden)``,
    ``Dense(z_dim)``, a decoder ``z @ w + b``; with a stabiliser of ``(M, C)`` (M candidates
    of C values per row) also ``c_m . c_j`` (C), the softmax sum (M) and the mixture (M M)."""
    m, c = stabiliser
    mix = (c, m, m * m) if m else ()
    return path_roundings(*embed, *(in_dim + hidden + 2 * ELEMENTWISE,) * seq_len, hidden,
                          hidden, z_dim + 1, *mix)


def finetuned_roundings(forward: int, steps: int) -> int:
    """A model after ``steps`` Adam steps, then applied: each step's gradient is one more
    backward and forward pass (``2 * forward``), and Adam's ``m / sqrt(v)`` is scale-free, so
    a gradient's relative error passes to the step about as is (``2 r`` at most). This holds
    for a gradient well away from 0; one exactly 0 (a padding row) is 0 in every order, and
    one within a few roundings of 0 has no preferred sign at all (not met by these tests)."""
    return forward * (1 + 2 * steps) + 2 * steps * ELEMENTWISE


def assert_within(got, want, atol, what: str = "") -> None:
    """``|got - want| <= atol`` elementwise (``atol`` scalar or broadcastable), reporting the
    worst element relative to its bound."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(atol, np.float64), err.shape)
    bad = ~(err <= bound)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bound > 0, err / bound, np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements beyond the float32 bound; worst"
            f" at {worst}: got {got[worst]!r}, want {want[worst]!r}, |diff| {err[worst]:.3g} >"
            f" bound {bound[worst]:.3g}"
        )


def assert_leaf_within(got, want, atol, what: str = "") -> None:
    """:func:`assert_within` for a parameter leaf of any float dtype. A bfloat16 leaf is
    rounded from float32 on both sides, so two float32 values ``atol`` apart may also land
    one bfloat16 spacing (``BF16_ULP`` relative) apart."""
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    bf16 = np.dtype(got.dtype).name == "bfloat16"
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert_within(got, want, atol + BF16_ULP * np.abs(want) if bf16 else atol, what)
