"""XLA compiler options for head generation, set per ``jit`` (never process-wide).

On CPU, XLA asks LLVM for 256-bit vectors by default, also on CPUs with AVX-512, because
512-bit code lowers the clock of some older Intel server CPUs. Head generation spends much
of its time in elementwise GRU gates (``tanh`` of ``[devices, H]`` blocks, 30 steps) that
LLVM vectorises; with 512-bit vectors they run on half as many instructions. Measured on
2 cores of an AMD EPYC (Zen 5, AVX-512), 65,536 devices, paired rounds, heads bitwise
equal: SASRec 1.25x at B = 1,024, GRU4Rec 1.29x at B = 1,024 and 1.13x at B = 256, DIN
(whose time is its 16,641-value decoder matmul) 1.0-1.14x. The benchmark's ``vector_width``
case measures it on your machine. On a CPU without AVX-512 LLVM uses the widest vectors
the CPU has, so the option cannot produce code the CPU lacks (measured on an AVX2 Zen 3:
0.93-1.03x, neutral).

Other backends get no options (``{}``): GPU and TPU compilers ignore CPU settings anyway,
and an empty dict keeps their compilation cache keys unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# LLVM's preferred vector width (bits) for generation on CPU; 0 = XLA's default (256)
CPU_VECTOR_WIDTH = 512
VECTOR_WIDTHS = (0, 128, 256, 512)


def generation_options(vector_width: int = CPU_VECTOR_WIDTH,
                       backend: str | None = None) -> dict[str, Any]:
    """``compiler_options`` for ``jax.jit`` of head generation on ``backend`` (default: JAX's
    default backend): on CPU, ``xla_cpu_prefer_vector_width`` (``vector_width`` bits; 0 =
    XLA's default); ``{}`` elsewhere. ValueError for a width LLVM does not take."""
    if vector_width not in VECTOR_WIDTHS:
        raise ValueError(f"vector_width={vector_width!r}: expected one of {VECTOR_WIDTHS} "
                         "(bits; 0 = XLA's default)")
    if (backend or jax.default_backend()) != "cpu" or not vector_width:
        return {}
    return {"xla_cpu_prefer_vector_width": vector_width}


def generation_jit(fn: Callable, vector_width: int = CPU_VECTOR_WIDTH, **jit_kwargs) -> Any:
    """``jax.jit(fn, **jit_kwargs)`` with :func:`generation_options` for the default backend:
    how the cloud, the HTTP engine and sharded generation compile head generation."""
    return jax.jit(fn, compiler_options=generation_options(vector_width) or None,
                   **jit_kwargs)
