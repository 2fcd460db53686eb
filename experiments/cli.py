"""What every command-line entry point does: shipped config names, errors without
tracebacks, and the first steps of ``main``.

Each entry point ends with ``if __name__ == "__main__": run()`` where ``run`` is
``cli.entry_point(main)``, the function the console scripts (``duet-train``, ...) call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Callable

from absl import app, flags, logging

from duet_jax.errors import ConfigError, DataError, RunError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

_MALLOC_KEEP_FREED = flags.DEFINE_bool(
    "malloc_keep_freed", False,
    "glibc only: serve every buffer, however large, from the heap and keep freed memory in "
    "the process (mallopt M_MMAP_MAX=0, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_ARENA_MAX=1). "
    "XLA-CPU mallocs every output; by default glibc maps fresh pages for large ones, so a "
    "jitted function with large outputs page-faults them on every call (DIN's heads: 17 MB "
    "per batch of 256, 68 MB per 1,024). Costs: memory freed is not returned to the OS, and "
    "all threads share one arena (one lock).")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit
# no block served by mmap: above the 32 MiB threshold glibc would still map (and page-fault)
# every large output afresh; with 0 it grows the heap instead (falling back to mmap only
# where the heap cannot grow)
MMAP_MAX = 0
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
# one arena, the main heap, for every thread. XLA-CPU allocates outputs on its worker
# threads, and glibc gives other threads arenas made of heaps of at most 64 MiB: a larger
# block there is mapped afresh whatever M_MMAP_MAX says, and unmapped when freed. DIN's
# head leaves pass 64 MiB from 2,048 devices per call; with the heap held in one arena
# their pages stay in the process (measured: minor page faults per call at B = 2,048 fell
# from 32,771, every page of the heads, to 4,096)
ARENA_MAX = 1


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
                         (_M_MMAP_MAX, MMAP_MAX),
                         (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                         (_M_ARENA_MAX, ARENA_MAX)):
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


def shipped_configs() -> list[str]:
    """Names of the config files shipped with the package (``experiments/configs``)."""
    return sorted(
        name[:-3] for name in os.listdir(CONFIG_DIR)
        if name.endswith(".py") and name not in ("__init__.py", "common.py")
    )


def resolve_config_arg(arg: str) -> str:
    """``--config=NAME[:variant]`` -> the shipped file's path when ``NAME`` is not a file
    but is the name of a shipped config (``movielens_100k:quick``); other args unchanged, so
    ``--config=path/to/file.py`` works as ml_collections documents it."""
    for prefix in ("--config=", "-config="):
        if arg.startswith(prefix):
            path, sep, variant = arg[len(prefix):].partition(":")
            name = path[:-3] if path.endswith(".py") else path
            if not os.path.exists(path) and os.sep not in path and name in shipped_configs():
                return f"{prefix}{os.path.join(CONFIG_DIR, name + '.py')}{sep}{variant}"
    return arg


def entry_point(main: Callable[[list[str]], None]) -> Callable[[], None]:
    """A console-script function running ``main`` under absl: shipped config names are
    resolved, and a user error (:class:`ConfigError`, :class:`DataError`) or a run that
    stopped safely (:class:`RunError`: workdir in use, unreadable checkpoints, full disk)
    prints one line, ``error: config.train.learning_rate=-1.0 is invalid: ...``, and exits
    with status 2 instead of a traceback."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (ConfigError, DataError, RunError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    def run() -> None:
        sys.argv = [resolve_config_arg(a) for a in sys.argv]
        app.run(guarded)

    return run
