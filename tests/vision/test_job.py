"""The vision job end to end: the tiny digits config through ``experiments.main`` (fast) and
the full digits job (slow)."""

import json
import os
import subprocess
import sys

import pytest

from duet_jax.errors import ConfigError
from experiments import vision
from experiments.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = {"base", "base_wide", "duet", "duet_request", "duet_shuffled", "duet_mean_z",
       "finetune_head", "finetune_all"}


def _main(config: str, workdir, timeout: int):
    run = subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--config={config}", f"--workdir={workdir}"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _check(workdir, stdout):
    assert "| method |" in stdout and "duet_vs_base" in stdout
    with open(os.path.join(workdir, "results.json")) as f:
        result = json.load(f)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == ALL
    for row in rows.values():
        for key in ("val_accuracy", "test_accuracy", "test_macro_f1", "test_ece"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key)
    # the capacity control is matched to DUET within 10%
    match = result["param_match"]
    assert abs(match["base_wide"] - match["duet"]) <= 0.1 * match["duet"]
    assert set(result["paired_bootstrap"]) >= {"duet_vs_base", "duet_vs_base_wide"}
    assert os.path.exists(os.path.join(workdir, "results.csv"))
    return rows


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_tiny_digits_job_through_main(tmp_path):
    stdout = _main(os.path.join(ROOT, "experiments/configs/digits.py") + ":tiny", tmp_path, 1200)
    rows = _check(tmp_path, stdout)
    # fine-tuning's choice is one of the grid's, made on validation
    assert rows["finetune_all"]["selected"]["steps"] in (1, 2)


def test_unknown_fields_are_named():
    config = digits.get_config("tiny")
    with config.unlocked():
        config.train.stepz = 3
    with pytest.raises(ConfigError, match=r"config\.train\.stepz"):
        vision.parse(config)
    config = digits.get_config("tiny")
    config.methods = "base,magic"
    with pytest.raises(ConfigError, match=r"config\.methods"):
        vision.parse(config)


@pytest.mark.slow
def test_full_digits_job(tmp_path):
    stdout = _main(os.path.join(ROOT, "experiments/configs/digits.py"), tmp_path, 1800)
    rows = _check(tmp_path, stdout)
    assert rows["base"]["val_accuracy"] > 0.8
    assert rows["base"]["val_accuracy"] - rows["base"]["test_accuracy"] > 0.05
