"""Slow: the README's main command end to end (``pytest -m slow``; CI runs it)."""

import json

import pytest

from tests.experiments.test_main import _main


@pytest.mark.slow
def test_default_main_job_duet_beats_base_for_sasrec(tmp_path):
    run = _main(
        "--config=experiments/configs/synthetic.py",
        f"--workdir={tmp_path}",
        "--config.train.progress=False",
        timeout=2400,  # ~4 minutes on 2 quiet cores; far longer when they are shared
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    base, duet = rows["base"], rows["duet"]
    assert base["auc"] > 0.75  # the cloud model learns real signal
    assert duet["auc"] > base["auc"] and duet["uauc"] > base["uauc"]


@pytest.mark.slow
def test_quick_main_job_on_real_movielens(real_data_dir, tmp_path):
    run = _main(
        "--config=experiments/configs/movielens_100k.py:quick",
        f"--workdir={tmp_path}",
        f"--config.data.data_dir={real_data_dir}",
        f"--config.data.tfds_dir={tmp_path / 'tfds'}",
        "--config.train.progress=False",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"base", "duet"}
    assert all(r["auc"] > 0.75 for r in rows.values())  # real signal on real data
