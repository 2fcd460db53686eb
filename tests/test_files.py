import json
import math
import os
import subprocess
import sys

import pytest

from duet_jax import files
from duet_jax.errors import RunError


def test_write_text_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    files.write_text_atomic(path, "first")
    files.write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text_atomic(path, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        files.write_text_atomic(path, Boom())  # not a str: fails mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_dumps_is_strict_json():
    text = files.dumps({"a": math.nan, "b": [1.0, math.inf], "c": (1, 2)})
    assert json.loads(text, parse_constant=lambda t: pytest.fail(t)) == {
        "a": None,
        "b": [1.0, None],
        "c": [1, 2],
    }


_HOLD = """
import sys
from duet_jax import files
with files.workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the parent says so
"""


def test_a_second_process_on_a_workdir_is_stopped_naming_the_holder(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunError, match=rf"{tmp_path} is in use by another run \(process "
                                           rf"{holder.pid} holds {tmp_path}/.lock\)"):
            with files.workdir_lock(tmp_path):
                pass
    finally:
        holder.communicate("go\n", timeout=60)
    with files.workdir_lock(tmp_path):  # free once the holder has ended
        pass
