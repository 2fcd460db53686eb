"""The adaptation grid's pieces on a tiny synthetic fleet: the main job's new methods and
trigger variants, one cell of the grid, and its report."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from duet_jax import metrics
from experiments import adapt_cell, adapt_report, experiment
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID_TINY = [
    "data.num_users=50", "data.num_items=100", "data.num_categories=5", "data.num_styles=3",
    "data.cloud_len=(10,12)", "data.device_len=(3,4)", "embed_dim=8", "seq_len=8",
    "sasrec.num_heads=2", "train.batch_size=64", "finetune.group_size=16",
]
GRID_OPTIONS = ["--learning_rates=3e-3", "--max_epochs=1", "--lags=0,2",
                "--finetune_selection_devices=4", "--bootstrap=20"]


def _config():
    config = tiny_config()
    config.train.num_epochs = 1
    config.finetune.steps = (0, 1)
    config.finetune.learning_rates = (1e-3,)
    return config


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_main_job_runs_controls_and_scores_every_trigger_variant(tmp_path):
    config = _config()
    config.methods = "base,base_wide,duet_shuffled,duet_mean"  # duet is trained for them
    config.data.eval_lags = (0, 3)
    config.data.eval_once = True
    rows = experiment.run(config, str(tmp_path))
    names = [r["method"] for r in rows]
    assert names == ["base", "base_wide", "base_wide@lag0", "base_wide@lag3", "base_wide@once",
                     "duet", "duet@lag0", "duet@lag3", "duet@once", "duet_shuffled",
                     "duet_mean"]
    by = {r["method"]: r for r in rows}
    # lag 0 rebuilds exactly today's triggers: the same rows, the same logits
    assert by["duet@lag0"]["auc"] == by["duet"]["auc"]
    assert by["duet@lag3"]["auc"] != by["duet"]["auc"]
    for row in rows:
        assert 0.0 <= row["auc"] <= 1.0


@pytest.mark.slow  # ~1 minute: trains 3 methods x 2 learning rates and fine-tunes twice
def test_one_cell_and_its_report(tmp_path):
    config = _config()
    data = experiment.load_data(config)
    options = adapt_cell.CellOptions(learning_rates=(3e-3, 1e-2), lags=(0, 2),
                                     finetune_learning_rates=(1e-3,), finetune_steps=(0, 1),
                                     finetune_selection_devices=4)
    cell = str(tmp_path / "cell")
    record = adapt_cell.run_cell(config, cell, data, options)
    preds = adapt_cell.load_predictions(cell)
    assert os.path.isfile(os.path.join(cell, "predictions", "duet__lag2.npz"))
    expected = {"base/lag0", "base_wide/lag0", "base_wide/lag2", "base_wide/once", "duet/lag0",
                "duet/lag2", "duet/once", "duet_shuffled/lag0", "duet_mean/lag0",
                "finetune_head/once", "finetune_all/once"}
    assert expected <= set(preds)
    test = data.test
    np.testing.assert_array_equal(preds["user"], test.user)
    # the stored metrics are those of the stored logits (same float64 code on the same rows)
    for key in expected:
        assert record["metrics"][key] == metrics.evaluate(test.user, test.label, preds[key])
    # fine-tuning with 0 steps in its grid: at worst it keeps Base (chosen on validation)
    assert set(record["selection"]) == {"base", "base_wide", "duet"}
    assert record["selection"]["duet"]["learning_rate"] in (3e-3, 1e-2)
    assert len(np.unique(data.val.user)) > 4  # so fine-tuning's selection sampled devices
    for mode in adapt_cell.FINETUNE_MODES:
        assert record["finetune"][mode]["selection_devices"] == 4
        # a stage's stored parts are gone once what they make up is stored whole
        assert not os.path.exists(os.path.join(cell, f"finetune_{mode}", "parts"))
    counts = record["params"]
    assert abs(counts["base_wide"] - counts["duet"]) <= 0.1 * counts["duet"]
    assert preds["drift"].shape == (data.num_users,)
    # where the cell's time went, stage by stage, in the order they ran
    assert list(record["stage_seconds"]) == [
        "train_base", "train_base_wide", "train_duet", "score_trained_and_controls",
        "finetune_head", "finetune_all", "metrics_drift_and_predictions"]
    assert all(s >= 0 for s in record["stage_seconds"].values())

    done = {("synthetic", "sasrec", 0): (cell, json.loads(json.dumps(record)))}
    text = adapt_report.write_report(str(tmp_path), done, [], "cmd", num_resamples=50)
    assert "DUET vs base_wide (capacity)" in text
    for name in ("adaptation.md", "adaptation.json", "lags.png", "drift.png"):
        assert os.path.getsize(tmp_path / name) > 0
    stored = json.loads((tmp_path / "adaptation.json").read_text())
    comparison = stored["cells"][0]["comparisons"]["DUET vs Base"]
    assert comparison["lo"] <= comparison["diff"] <= comparison["hi"]
    # one seed: its difference is the mean over seeds, with no spread
    summary = next(s for s in stored["over_seeds"] if s["comparison"] == "DUET vs Base")
    assert (summary["mean"], summary["sd"], summary["seeds"]) == (comparison["diff"], None, 1)
    assert "## Over seeds" in text


def _grid(cmd: list[str]) -> subprocess.CompletedProcess:
    # a subprocess: importing experiments.adapt_grid here would define its absl flags beside
    # other experiments' in the same test session
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _grid_part(workdir, *extra: str) -> dict:
    """Run one part of a tiny synthetic grid in ``workdir``; -> its adaptation.json."""
    _grid([sys.executable, "-m", "experiments.adapt_grid", "--datasets=synthetic",
           f"--workdir={workdir}", *GRID_OPTIONS, *(f"--set={s}" for s in GRID_TINY), *extra])
    return json.loads((workdir / "adaptation.json").read_text())


def _cells(report: dict) -> list[tuple]:
    return [(c["dataset"], c["model"], c["seed"]) for c in report["cells"]]


@pytest.mark.slow  # one grid cell end to end (30-50 s); CI runs it
def test_a_part_of_the_grid_reports_every_finished_cell_of_its_workdir(tmp_path):
    first = _grid_part(tmp_path, "--models=sasrec", "--seeds=1")
    assert _cells(first) == [("synthetic", "sasrec", 0)] and first["missing"] == []
    # finished cells the grid cannot report are named with the reason, never dropped quietly
    record = tmp_path / "cells" / "synthetic" / "sasrec" / "seed0" / "cell.json"
    for odd in ("cells/no_such_dataset/sasrec/seed0", "cells/synthetic/sasrec/latest"):
        (tmp_path / odd).mkdir(parents=True)
        shutil.copy(record, tmp_path / odd / "cell.json")

    # another worker's part (here: report only) keeps the first part's cell in the report
    second = _grid_part(tmp_path, "--models=gru4rec", "--seeds=1", "--report_only")
    assert _cells(second) == [("synthetic", "sasrec", 0)]
    assert second["missing"] == ["synthetic / gru4rec / seed 0"]
    assert "--models=gru4rec,sasrec " in second["command"]
    assert "--seeds=1 " in second["command"] and "--first_seed" not in second["command"]
    ignored = sorted(second["ignored"])
    assert len(ignored) == 2
    assert "no_such_dataset" in ignored[0] and "no config" in ignored[0]
    assert "latest" in ignored[1] and "not a seed<k> directory" in ignored[1]
    text = (tmp_path / "adaptation.md").read_text()
    assert "**Missing cells (1)**" in text and "**Not part of this report (2)**" in text

    # the report's command rebuilds the same report
    command = shlex.split(second["command"])
    assert command[:3] == ["python", "-m", "experiments.adapt_grid"]
    again = _grid([sys.executable, *command[1:], "--report_only"])
    assert again.returncode == 0
    rebuilt = json.loads((tmp_path / "adaptation.json").read_text())
    assert (_cells(rebuilt), rebuilt["missing"]) == (_cells(second), second["missing"])

    # a finished cell made with other settings is missing from the report, not reused
    other = _grid_part(tmp_path, "--models=sasrec", "--seeds=1", "--report_only",
                       "--max_epochs=2")
    assert _cells(other) == [] and other["missing"] == ["synthetic / sasrec / seed 0"]


def test_seed_summaries_give_mean_sd_and_the_seeds_on_each_side_of_zero():
    def stats(diff, lo, hi):
        return {"comparisons": {"DUET vs Base": {"diff": diff, "lo": lo, "hi": hi}}}

    groups = {("d", "m"): [(0, {}, stats(0.03, 0.01, 0.05)), (1, {}, stats(0.01, -0.01, 0.02)),
                           (2, {}, stats(-0.01, -0.02, -0.005))],
              ("d", "one"): [(0, {}, stats(0.02, 0.01, 0.03))]}
    out = adapt_report.seed_summaries(groups)
    three = out[("d", "m", "DUET vs Base")]
    assert three["mean"] == pytest.approx(0.01)
    assert three["sd"] == pytest.approx(0.02)  # sqrt(((.02)^2 + 0 + (.02)^2) / 2)
    assert (three["seeds"], three["above"], three["below"]) == (3, 1, 1)
    assert adapt_report._fmt_summary(three) == "+0.0100 ± 0.0200 (1/3 above, 1 below)"
    one = out[("d", "one", "DUET vs Base")]
    assert one["sd"] is None  # one seed: no spread to report
    assert adapt_report._fmt_summary(one) == "+0.0200 (1/1 above)"
    assert ("d", "m", "DUET vs base_wide (capacity)") not in out  # never compared: no entry
