"""What every command-line entry point does first."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from absl import app, flags, logging

_MALLOC_KEEP_FREED = flags.DEFINE_bool(
    "malloc_keep_freed", False,
    "glibc only: serve buffers up to 32 MiB from the heap and keep freed memory in the "
    "process (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). XLA-CPU mallocs every output; by "
    "default glibc maps fresh pages for large ones, so a jitted function with large outputs "
    "page-faults them on every call (DIN's heads: 17 MB per batch of 256). Costs: memory "
    "freed is not returned to the OS.")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc (what ``--malloc_keep_freed`` needs)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def malloc_keep_freed() -> None:
    """Apply ``--malloc_keep_freed``'s glibc settings to this process; raises ``OSError``
    where the C library is not glibc or refuses them."""
    name = ctypes.util.find_library("c")
    if not is_glibc() or not name:
        raise OSError(f"--malloc_keep_freed needs glibc; this is {platform.system()} "
                      f"with {platform.libc_ver()[0] or 'an unknown C library'}")
    libc = ctypes.CDLL(name)
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                         (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({param}, {value}) refused")


def start(argv: list[str]) -> None:
    """Refuse stray positional arguments, log at WARNING unless ``--verbosity`` was given
    (orbax, jax and TFDS log every checkpoint and build step at INFO), and apply
    ``--malloc_keep_freed``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _MALLOC_KEEP_FREED.value:
        malloc_keep_freed()  # before JAX allocates anything large


def malloc_setting() -> bool | None:
    """``--malloc_keep_freed`` as this run parsed it (None outside a command-line run), for
    the environment record: it changes speed, never results."""
    if not flags.FLAGS.is_parsed():
        return None
    return _MALLOC_KEEP_FREED.value
