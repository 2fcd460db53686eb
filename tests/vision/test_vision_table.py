"""The seeds table: mean +- std, pooled per-device bootstrap, files written."""

import json
import os

import numpy as np

from experiments import vision_report as vision_table


def _result(seed: int, gain: float) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 0.8, size=10)
    per_device = {"base": base.tolist(), "base_wide": (base + 0.01).tolist(),
                  "duet": (base + gain).tolist()}
    rows = [{"method": name, "params": 100, "selected": {}, "val_accuracy": 0.9,
             "test_accuracy": float(np.mean(acc)), "test_device_accuracy": float(np.mean(acc)),
             "test_macro_f1": 0.5, "test_ece": 0.1} for name, acc in per_device.items()]
    return {"seed": seed, "rows": rows, "per_device_test_accuracy": per_device,
            "paired_bootstrap": {}, "data": {}, "param_match": {}}


def test_aggregate_and_write(tmp_path):
    results = [_result(s, 0.05) for s in range(3)]
    agg = vision_table.aggregate(results, num_resamples=200)
    duet = next(e for e in agg["table"] if e["method"] == "duet")
    want = [r["rows"][2]["test_accuracy"] for r in results]
    assert np.isclose(duet["test_accuracy"]["mean"], np.mean(want))
    assert np.isclose(duet["test_accuracy"]["std"], np.std(want, ddof=1))
    ci = agg["paired_bootstrap"]["duet_vs_base"]
    # every device gains exactly 0.05: the interval collapses onto it
    assert ci["num_users"] == 30 and np.isclose(ci["mean"], 0.05)
    assert np.isclose(ci["lo"], 0.05) and np.isclose(ci["hi"], 0.05)
    assert np.isclose(agg["paired_bootstrap"]["duet_vs_base_wide"]["mean"], 0.04)
    table = vision_table.write(agg, str(tmp_path))
    assert "duet_vs_base" in table and "± " in table
    for name in ("vision_table.md", "vision_table.csv", "vision_accuracy.png"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "vision_table.json") as f:
        assert json.load(f)["seeds"] == [0, 1, 2]
