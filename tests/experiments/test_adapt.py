"""The adaptation grid's pieces on a tiny synthetic fleet: the main job's new methods and
trigger variants, one cell of the grid, and its report."""

import json
import os

import numpy as np
import pytest

from duet_jax import metrics
from experiments import adapt_cell, adapt_report, experiment
from tests.conftest import tiny_config


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
    counts = record["params"]
    assert abs(counts["base_wide"] - counts["duet"]) <= 0.1 * counts["duet"]
    assert preds["drift"].shape == (data.num_users,)

    done = {("synthetic", "sasrec", 0): (cell, json.loads(json.dumps(record)))}
    text = adapt_report.write_report(str(tmp_path), done, [], "cmd", num_resamples=50)
    assert "DUET vs base_wide (capacity)" in text
    for name in ("adaptation.md", "adaptation.json", "lags.png", "drift.png"):
        assert os.path.getsize(tmp_path / name) > 0
    stored = json.loads((tmp_path / "adaptation.json").read_text())
    comparison = stored["cells"][0]["comparisons"]["DUET vs Base"]
    assert comparison["lo"] <= comparison["diff"] <= comparison["hi"]
