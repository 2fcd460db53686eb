"""What every entry point does first: the opt-in glibc malloc settings."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

from duet_jax.errors import DivergenceError, RunError
from experiments import cli, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, *args: str) -> str:
    """What ``code`` prints, run with ``args`` in a fresh Python process from the project root
    (malloc settings last for the whole process)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.skipif(not cli.is_glibc(), reason="glibc only")
def test_malloc_keep_freed_is_accepted_by_glibc():
    # in a subprocess: the settings last for the whole process
    code = "from experiments import cli; cli.malloc_keep_freed(); print('applied')"
    assert _python(code) == "applied"


# in a subprocess: malloc a block of argv[2] MiB, far above glibc's largest mmap threshold
# (32 MiB), on the main thread or on a new one (as XLA-CPU allocates its outputs), and say
# whether it lies in the process's [heap] mapping (brk) rather than a fresh anonymous map
_WHERE_BLOCK = """
import ctypes, ctypes.util, sys, threading
from experiments import cli
mode, mib, thread = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "keep":
    cli.malloc_keep_freed()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
found = []
def allocate():
    found.append(libc.malloc(mib << 20))
if thread == "worker":
    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join()
else:
    allocate()
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    lo, hi = (int(x, 16) for x in span.split("-"))
    if lo <= found[0] < hi:
        print("heap" if line.rstrip().endswith("[heap]") else "mapped")
"""


def _where(mode: str, mib: int, thread: str) -> str:
    return _python(_WHERE_BLOCK, mode, str(mib), thread)


@pytest.mark.skipif(not cli.is_glibc(), reason="glibc only")
def test_malloc_keep_freed_serves_blocks_above_32_mib_from_the_heap():
    # glibc's default maps a 64 MiB block afresh (page-faulted on every use); with the
    # flag it comes from the heap, whose freed pages stay in the process
    assert {m: _where(m, 64, "main") for m in ("keep", "default")} == {
        "keep": "heap", "default": "mapped"}


@pytest.mark.skipif(not cli.is_glibc(), reason="glibc only")
def test_malloc_keep_freed_serves_other_threads_blocks_above_64_mib_from_the_heap():
    # another thread's arena is made of heaps of at most 64 MiB, so glibc maps a larger
    # block afresh even with M_MMAP_MAX = 0; with one arena (M_ARENA_MAX = 1) it comes from
    # the main heap. XLA-CPU allocates its outputs on such threads.
    assert {m: _where(m, 128, "worker") for m in ("keep", "default")} == {
        "keep": "heap", "default": "mapped"}


def test_malloc_keep_freed_names_what_is_missing_elsewhere(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(OSError, match="--malloc_keep_freed needs glibc"):
        cli.malloc_keep_freed()


def test_environment_outside_a_command_line_run_has_no_malloc_setting():
    assert cli.malloc_setting() is None
    assert report.environment()["malloc_keep_freed"] is None


def test_environment_records_the_speed_settings_of_the_environment(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert report.environment()["env"] == {"XLA_FLAGS": None,
                                           "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}


def test_shipped_config_names_resolve_to_files():
    names = cli.shipped_configs()
    assert {"synthetic", "movielens_100k", "fleet"} <= set(names)
    path = cli.resolve_config_arg("--config=movielens_100k:quick")
    assert path == f"--config={os.path.join(cli.CONFIG_DIR, 'movielens_100k.py')}:quick"
    assert os.path.isfile(path.split("=", 1)[1].rsplit(":", 1)[0])
    # paths and other flags pass through unchanged
    for arg in ("--config=experiments/configs/synthetic.py", "--workdir=movielens_100k",
                "--config=no_such_config"):
        assert cli.resolve_config_arg(arg) == arg


@pytest.mark.skipif(shutil.which("duet-train") is None, reason="package not pip-installed")
@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_console_script_runs_from_any_directory(tmp_path):
    """``duet-train`` after ``pip install``: no clone on the path, shipped default config."""
    from tests.experiments.test_main import TINY

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    workdir = tmp_path / "run"
    proc = subprocess.run(["duet-train", f"--workdir={workdir}", *TINY],
                          cwd=tmp_path, env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "results.json").is_file()
    bad = subprocess.run(["duet-train", f"--workdir={workdir}", "--config.train.batch_size=0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "config.train.batch_size=0 is invalid" in bad.stderr


@pytest.mark.parametrize("error", [
    RunError("runs/x is in use by another run (process 7 holds runs/x/.lock)"),
    DivergenceError(1000.0, "a smaller value (e.g. 100): training diverged"),
])
def test_a_run_that_stops_safely_prints_one_line_and_exits_2(error, monkeypatch, capsys):
    def main(argv):
        raise error

    monkeypatch.setattr(sys, "argv", ["duet-train"])
    with pytest.raises(SystemExit) as exit_info:
        cli.entry_point(main)()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n" and "Traceback" not in err
