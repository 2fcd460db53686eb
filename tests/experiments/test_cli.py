"""What every entry point does first: the opt-in glibc malloc settings."""

import os
import platform
import subprocess
import sys

import pytest

from experiments import cli, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not cli.is_glibc(), reason="glibc only")
def test_malloc_keep_freed_is_accepted_by_glibc():
    # in a subprocess: the settings last for the whole process
    code = "from experiments import cli; cli.malloc_keep_freed(); print('applied')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "applied", proc.stderr[-2000:]


def test_malloc_keep_freed_names_what_is_missing_elsewhere(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(OSError, match="--malloc_keep_freed needs glibc"):
        cli.malloc_keep_freed()


def test_environment_outside_a_command_line_run_has_no_malloc_setting():
    assert cli.malloc_setting() is None
    assert report.environment()["malloc_keep_freed"] is None
