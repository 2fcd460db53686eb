"""The paper-table command: cells, mean ± std over seeds, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import paper_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "data.num_users=50", "data.num_items=100", "data.num_categories=5", "data.num_styles=3",
    "data.cloud_len=(10,12)", "data.device_len=(3,4)", "embed_dim=8", "seq_len=8",
    "sasrec.num_heads=2", "train.batch_size=64", "train.num_epochs=1",
    "train.progress=False", "finetune.steps=(0,2)", "finetune.group_size=16",
]


def _run(workdir, *extra):
    cmd = [sys.executable, "-m", "experiments.paper_table", "--datasets=synthetic",
           "--models=sasrec", "--seeds=2", "--ablation=", f"--workdir={workdir}",
           *(f"--set={s}" for s in TINY), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_paper_table_runs_cells_summarises_and_resumes(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "paper_table.json").read_text())
    assert out["missing"] == []
    # where each cell ran, from the cell's own record (a report may be rebuilt elsewhere)
    assert sorted(out["cell_machines"]) == ["synthetic / sasrec / seed 0",
                                            "synthetic / sasrec / seed 1"]
    for machine in out["cell_machines"].values():
        assert machine["processor"] and machine["cpu_count"] >= 1
        assert set(machine["code"]) == {"commit", "dirty", "dirty_paths"}
    rows = out["rows"]
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        (m, s) for m in ("base", "duet", "finetune") for s in (0, 1)
    ]
    for entry in out["summary"]:
        values = [r["auc"] for r in rows if r["method"] == entry["method"]]
        assert entry["n"] == 2
        # float64 mean and std of two values, maybe in another order: a few ulps (~1e-16),
        # far inside approx's default relative 1e-6
        assert entry["auc_mean"] == pytest.approx(np.mean(values))
        assert entry["auc_std"] == pytest.approx(np.std(values, ddof=1))
    for name in ("paper_table.md", "paper_table.csv", "paper_auc.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "± " in (tmp_path / "paper_table.md").read_text()

    cell = tmp_path / "cells" / "synthetic" / "sasrec" / "seed1" / "rows.json"
    mtime = cell.stat().st_mtime_ns
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cell synthetic" not in again.stdout  # nothing recomputed
    assert cell.stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "paper_table.json").read_text())["rows"] == rows

    # another config is another cell: report-only names the missing ones
    other = _run(tmp_path, "--report_only", "--set=train.learning_rate=0.01")
    assert other.returncode == 0, other.stderr[-3000:]
    missing = json.loads((tmp_path / "paper_table.json").read_text())["missing"]
    assert missing == ["synthetic / sasrec / seed 0", "synthetic / sasrec / seed 1"]


@pytest.mark.parametrize(
    "flag, message",
    [("--set=train.num_epoch=3", "--set train.num_epoch='3' is invalid: expected a field"),
     ("--set=train.num_epochs", "expected FIELD=VALUE"),
     ("--datasets=nope", "no config experiments/configs/nope.py"),
     ("--set=train.learning_rate=-1", "config.train.learning_rate")],
)
def test_bad_flags_fail_before_any_work(tmp_path, flag, message):
    proc = _run(tmp_path, flag)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "cells").exists()


def test_summary_of_a_single_seed_has_no_std():
    rows = [{"dataset": "d", "model": "m", "method": "base", "seed": 0, "auc": 0.7,
             **{k: 0.5 for k in paper_report.SUMMARISED if k != "auc"}}]
    (entry,) = paper_report.summarise(rows)
    assert entry["auc_mean"] == 0.7 and entry["auc_std"] is None and entry["n"] == 1
    assert "0.7000 |" in paper_report.markdown([entry], ("base",))


# Finished synthetic cells made by hand (no training), in a subprocess: importing
# experiments.paper_table here would define its absl flags a second time beside
# experiments.main's in the same test session.
_MAKE_CELLS = """
import json, os, sys
from duet_jax import cache, files
from duet_jax.metrics import METRIC_NAMES
from experiments import experiment, paper_table
workdir, tiny, cells = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for cell in cells:
    seed = cell["seed"]
    config = paper_table.cell_config("synthetic", "sasrec", seed, False, tiny)
    path = paper_table.cell_dir(workdir, "synthetic", "sasrec", seed)
    rows = [{"model": "sasrec", "method": m, "seed": seed, "dataset": "synthetic",
             **{k: 0.5 for k in METRIC_NAMES}} for m in ("base", "finetune", "duet")]
    extra = {"environment": {"processor": "test", "cpu_count": 1}}
    if "fingerprint" in cell:
        extra["data_fingerprint"] = cell["fingerprint"]
    cache.save_record(os.path.join(path, "rows.json"), paper_table.cell_identity(config),
                      rows, key="rows", **extra)
    if cell.get("base_data"):  # the sample fingerprint its Base run recorded
        files.write_text_atomic(os.path.join(path, "base", "run_config.json"), json.dumps(
            {"data": experiment.load_data(config).fingerprint()}))
"""


def _cells(workdir, *cells: dict) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _MAKE_CELLS, str(workdir), json.dumps(TINY), json.dumps(cells)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cells_from_other_data_are_not_reused_and_old_cells_are_marked(tmp_path):
    _cells(tmp_path, {"seed": 0, "fingerprint": {"member": "other data"}},  # stale
           {"seed": 1})  # made before fingerprints
    proc = _run(tmp_path, "--report_only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "paper_table.json").read_text())
    assert out["stale"] == out["missing"] == ["synthetic / sasrec / seed 0"]
    assert out["unverified"] == ["synthetic / sasrec / seed 1"]
    assert all(r["data_verified"] is False for r in out["rows"])
    assert "its data changed since it was made ({'member': 'other data'} -> None)" in proc.stdout
    md = (tmp_path / "paper_table.md").read_text()
    assert "synthetic / sasrec / seed 1: unverified (made before data fingerprints)" in md


def test_an_old_cell_whose_samples_match_is_stamped_without_retraining(tmp_path):
    _cells(tmp_path, {"seed": 0, "base_data": True}, {"seed": 1, "base_data": True})
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "its samples match today's data, stamped" in proc.stdout
    assert "cell synthetic / sasrec / seed 0\n" not in proc.stdout  # nothing trained
    stored = json.loads((tmp_path / "cells/synthetic/sasrec/seed0/rows.json").read_text())
    assert stored["data_fingerprint"] is None  # synthetic: the config is the data
    assert stored["data_verified"].startswith("samples fingerprint matched")
    assert json.loads((tmp_path / "paper_table.json").read_text())["unverified"] == []


@pytest.mark.slow  # trains one cell
def test_a_cell_from_other_data_is_moved_aside_and_recomputed(tmp_path):
    _cells(tmp_path, {"seed": 0, "fingerprint": {"member": "other data"}},
           {"seed": 1, "fingerprint": None})  # synthetic: None is today's fingerprint
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = tmp_path / "cells" / "synthetic" / "sasrec"
    assert "cell synthetic / sasrec / seed 0: its old results moved to" in proc.stdout
    assert (cell / "seed0.stale" / "rows.json").is_file()
    stored = json.loads((cell / "seed0" / "rows.json").read_text())
    assert stored["data_fingerprint"] is None and stored["rows"][0]["auc"] != 0.5
    assert "cell synthetic / sasrec / seed 1" not in proc.stdout  # still valid: reused
