"""Measuring compiled JAX functions: compile and warm-up apart from steady state, XLA's cost
analysis, memory, and the machine's own peak matmul rate and memory bandwidth.

A measurement is ``compile`` (``jit(f).lower(...).compile()``), one ``first call`` (warm-up:
allocations, thread pools, caches), then ``repeats`` timed runs of a *pass*, summarised by
median, quartiles and range. ``jax.block_until_ready`` ends every timed region: JAX dispatches
asynchronously, so an unblocked timer measures only the dispatch.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Timing:
    """Seconds of one measured pass: compile, first call, and every timed repeat."""

    compile_s: float
    first_call_s: float
    repeats_s: list[float]

    @property
    def median_s(self) -> float:
        return float(np.median(self.repeats_s))

    def summary(self) -> dict:
        r = np.asarray(self.repeats_s)
        q1, q3 = np.percentile(r, [25, 75])
        return {
            "compile_s": self.compile_s,
            "first_call_s": self.first_call_s,
            "repeats": len(r),
            "median_s": float(np.median(r)),
            "iqr_s": float(q3 - q1),
            "min_s": float(r.min()),
            "max_s": float(r.max()),
            "repeats_s": [float(x) for x in r],
        }


def compile_timed(fn: Callable, *args, **jit_kwargs) -> tuple[Any, float]:
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()`` and the seconds it took."""
    started = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - started


def pipelined_pass(compiled: Callable, args_per_call: Iterable[tuple]) -> Callable[[], None]:
    """A pass that calls ``compiled`` on every ``args_per_call`` entry, keeping one call in
    flight while the next is dispatched (the host prepares call i+1 while call i runs), and
    blocks on the last (results discarded). A one-shot iterable (a generator) makes a pass
    that runs once."""
    def run():
        previous = None
        for args in args_per_call:
            out = compiled(*args)
            if previous is not None:
                jax.block_until_ready(previous)
            previous = out
        jax.block_until_ready(previous)

    return run


def time_pass(run_pass: Callable[[], Any], repeats: int, compile_s: float = 0.0,
              warmup: Callable[[], Any] | None = None, budget_s: float | None = None,
              min_repeats: int = 1) -> Timing:
    """Time ``run_pass()`` (which must block on its results) ``repeats`` times after one
    ``warmup()`` call (default: a whole pass; a single batch suffices to warm a compiled
    function). When the first timed pass shows that ``repeats`` would exceed ``budget_s``,
    fewer are run, but at least ``min_repeats``."""
    started = time.perf_counter()
    (warmup or run_pass)()
    first = time.perf_counter() - started
    times = []
    while len(times) < repeats:
        started = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - started)
        if budget_s is not None and len(times) == 1:
            repeats = max(min_repeats, min(repeats, int(budget_s // max(times[0], 1e-9))))
    return Timing(compile_s=compile_s, first_call_s=first, repeats_s=times)


def cost(compiled) -> dict:
    """FLOPs and bytes accessed of one call, from XLA's cost analysis of the compiled
    executable (a dict, or in older JAX a one-element list of dicts); NaN if unavailable."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        analysis = None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    return {
        "flops": float(analysis.get("flops", float("nan"))),
        "bytes_accessed": float(analysis.get("bytes accessed", float("nan"))),
    }


def matmul_flops(fn: Callable, *args) -> dict:
    """FLOPs of every matrix product in ``fn``'s jaxpr (``2 * out_size * contracted``), with
    loop bodies counted as often as they run.

    XLA's :func:`cost` counts a loop body once: the encoder GRU's 30 steps (a ``scan``) and
    fine-tuning's k Adam steps look like one. A ``scan`` has a static length, so this count
    multiplies its body by it; a ``while`` loop (unknown trip count) is counted once and
    reported in ``uncounted_while_loops``. Element-wise work is left out, so this is the
    numerator for the matmul peak.
    """
    from jax.extend import core as jex_core

    whiles = 0

    def walk(jaxpr) -> float:
        nonlocal whiles
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
            times = eqn.params.get("length", 1) if name == "scan" else 1
            whiles += name == "while"
            subs = [j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j
                    for j in jex_core.jaxprs_in_params(eqn.params)]
            if name == "cond":  # one branch runs: count the dearest
                total += max((walk(j) for j in subs), default=0.0)
            else:
                total += times * sum(walk(j) for j in subs)
        return total

    flops = walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return {"matmul_flops": flops, "uncounted_while_loops": whiles}


def compiled_memory(compiled) -> dict:
    """Argument, output and temporary bytes of one call (XLA's memory analysis)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        stats = None
    if stats is None:
        return {}
    return {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias")
        if hasattr(stats, f"{name}_size_in_bytes")
    }


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ``/proc/self/clear_refs``), so the next
    :func:`peak_rss_bytes` is the peak since now. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """Linux ``/proc/self/status`` field ``field`` (a size in kB) in bytes; None where there
    is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux ``VmRSS``); None where ``/proc`` has no such field."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size: since the last :func:`reset_peak_rss` (``VmHWM``), else since
    the process started (``getrusage``)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_memory() -> dict | None:
    """``memory_stats()`` of the first JAX device (GPU/TPU: bytes in use, peak); None on CPU,
    whose client keeps no such statistics."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(v) for k, v in stats.items() if k in keep}


# ----------------------------------------------------------------------------- peaks


def peak_matmul(size: int = 2048, repeats: int = 5) -> dict:
    """Float32 matmul rate of this backend: ``[size, size] @ [size, size]``, best of
    ``repeats`` (the peak a kernel can reach here), and the median."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.float32)
    f, _ = compile_timed(jnp.matmul, a, b)
    timing = time_pass(lambda: jax.block_until_ready(f(a, b)), repeats)
    flops = 2.0 * size**3
    return {"size": size, "flops_per_s": flops / min(timing.repeats_s),
            "median_flops_per_s": flops / timing.median_s}


def peak_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """Memory bandwidth: ``x = x + 1`` over a float32 array of ``megabytes`` (read and
    written once: 2x its bytes), best of ``repeats``, and the median. The buffer is donated
    and reused, so fresh-page faults of a new output are not counted as bandwidth."""
    n = megabytes * 2**20 // 4
    state = {"x": jnp.zeros((n,), jnp.float32)}
    f, _ = compile_timed(lambda v: v + 1.0, state["x"], donate_argnums=0)

    def run():
        state["x"] = jax.block_until_ready(f(state["x"]))

    timing = time_pass(run, repeats)
    moved = 2.0 * n * 4
    return {"megabytes": megabytes, "bytes_per_s": moved / min(timing.repeats_s),
            "median_bytes_per_s": moved / timing.median_s}
