"""Loading a trained run: the same version after a restart; bad runs refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from duet_jax.errors import ConfigError
from duet_jax.serving.engine import buckets, load_run
from tests.serving.conftest import write_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_restart_serves_the_same_version(run_dir, loaded):
    again = load_run(os.path.join(run_dir, "checkpoints"))  # the checkpoints dir works too
    assert again.version == loaded.version and again.version.startswith("duet-")
    assert again.step == 7 and again.method == "duet"
    for a, b in zip(np.asarray(again.params["backbone"]["item_embedding"]),
                    np.asarray(loaded.params["backbone"]["item_embedding"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_other_parameters_another_version(tmp_path, loaded):
    write_run(str(tmp_path / "duet"), seed=1)
    assert load_run(str(tmp_path / "duet")).version != loaded.version


def _copy(run_dir, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(run_dir, target)
    return target


def test_bad_runs_are_refused_naming_the_problem(run_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"run_config\.json"):
        load_run(str(tmp_path / "missing"))
    bad = _copy(run_dir, tmp_path)
    config_path = os.path.join(bad, "run_config.json")
    identity = json.load(open(config_path))
    json.dump({**identity, "method": "base"}, open(config_path, "w"))
    with pytest.raises(ConfigError, match="DUET method"):
        load_run(bad)
    identity["config"]["embed_dim"] = 16  # incompatible: the model no longer fits
    json.dump(identity, open(config_path, "w"))
    with pytest.raises(ConfigError, match="differ"):
        load_run(bad)


def _damaged_copy(run_dir, tmp_path) -> str:
    """A copy of the run whose checkpoint step has every data file cut in half."""
    bad = _copy(run_dir, tmp_path)
    state = os.path.join(bad, "checkpoints", "7", "state")
    for root, _, names in os.walk(state):
        for name in names:
            if name not in ("_METADATA", "commit_success.txt"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(max(os.path.getsize(f.name) // 2, 1))
    return bad


def test_a_corrupt_checkpoint_is_refused(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="readable checkpoint at step 7"):
        load_run(_damaged_copy(run_dir, tmp_path))


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.serve", *flags],
                          capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("flag, named", [
    ("", "--checkpoint="),  # not a run directory
    ("--cpu_vector_width=300", "--cpu_vector_width=300"),  # not a width LLVM takes
])
def test_serve_cli_refuses_in_one_line(tmp_path, flag, named):
    out = _serve(f"--checkpoint={tmp_path}", *([flag] if flag else []))
    assert out.returncode == 2
    assert f"error: {named}" in out.stderr and "Traceback" not in out.stderr


def test_serve_cli_refuses_a_damaged_checkpoint_without_a_traceback(run_dir, tmp_path):
    # Orbax's reads of the damaged step that are still in flight end after their asyncio
    # loop has closed; before duet_jax.checkpoint dropped those callbacks, many runs printed
    # an "Event loop is closed" traceback for each of them around the error line (a race:
    # this test catches a regression in some runs, not every one).
    bad = _damaged_copy(run_dir, tmp_path)
    out = _serve(f"--checkpoint={bad}")
    assert out.returncode == 2
    assert "error: --checkpoint=" in out.stderr and "readable checkpoint at step 7" in out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr


def test_buckets():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48, min_bucket=8) == [8, 16, 32, 48]
    assert buckets(1) == [1]
