"""The encoder-accuracy grid's bookkeeping: aggregation over seeds, paired differences,
which stored runs count as finished, and the report of crafted finished cells."""

import json
import os
import subprocess
import sys

import pytest

from experiments import encoder_accuracy as ea

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The aggregation is plain Python float64 arithmetic on a few decimal inputs: each input
# carries a rounding error <= 2^-53 relative (~1e-16), and a mean, sum of squares or square
# root of three such values adds a few ulps more, so 1e-12 absolute is far above any
# rounding and far below the 1e-3 scale of the hand-computed values.
TOL = 1e-12

VALUES = {
    "gru": {0: {"auc": 0.80, "uauc": 0.70}, 1: {"auc": 0.82, "uauc": 0.74},
            2: {"auc": 0.84, "uauc": 0.72}},
    "attention": {0: {"auc": 0.79, "uauc": 0.71}, 1: {"auc": 0.80, "uauc": 0.72},
                  2: {"auc": 0.84, "uauc": 0.70}},
    "base": {0: {"auc": 0.78, "uauc": 0.69}, 1: {"auc": 0.81, "uauc": 0.70},
             2: {"auc": 0.81, "uauc": 0.71}},
}


def test_mean_sd_is_sample_sd():
    mean, sd = ea.mean_sd([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    assert mean == pytest.approx(7 / 3, abs=TOL)
    assert sd == pytest.approx((7 / 3) ** 0.5, abs=TOL)
    assert ea.mean_sd([0.5]) == (0.5, None)  # one seed: no spread


def test_aggregate_hand_computed():
    out = ea.aggregate(VALUES, reference="gru")
    gru, att, base = out["gru"], out["attention"], out["base"]
    # gru AUC 0.80/0.82/0.84: mean 0.82, deviations -0.02/0/0.02 -> sd sqrt(0.0008/2) = 0.02
    assert gru["auc"]["mean"] == pytest.approx(0.82, abs=TOL)
    assert gru["auc"]["sd"] == pytest.approx(0.02, abs=TOL)
    assert gru["auc"]["values"] == [0.80, 0.82, 0.84]
    assert gru["auc"]["seeds"] == [0, 1, 2]
    # attention AUC 0.79/0.80/0.84: mean 0.81, squared deviations 4+1+9 (e-4) / 2 -> 7e-4
    assert att["auc"]["mean"] == pytest.approx(0.81, abs=TOL)
    assert att["auc"]["sd"] == pytest.approx(0.0007 ** 0.5, abs=TOL)
    # paired attention - gru, AUC: -0.01/-0.02/0.00 -> mean -0.01, sd sqrt(2e-4/2) = 0.01
    diff = att["auc"]["vs_reference"]
    assert diff["values"] == pytest.approx([-0.01, -0.02, 0.0], abs=TOL)
    assert diff["mean"] == pytest.approx(-0.01, abs=TOL)
    assert diff["sd"] == pytest.approx(0.01, abs=TOL)
    # UAUC: attention 0.71/0.72/0.70 (mean 0.71, sd 0.01); minus gru 0.70/0.74/0.72:
    # +0.01/-0.02/-0.02 -> mean -0.01, squared deviations 4+1+1 (e-4) / 2 -> 3e-4
    assert att["uauc"]["mean"] == pytest.approx(0.71, abs=TOL)
    assert att["uauc"]["sd"] == pytest.approx(0.01, abs=TOL)
    assert att["uauc"]["vs_reference"]["mean"] == pytest.approx(-0.01, abs=TOL)
    assert att["uauc"]["vs_reference"]["sd"] == pytest.approx(0.0003 ** 0.5, abs=TOL)
    # DUET-gru - Base, AUC: 0.02/0.01/0.03 -> mean 0.02, sd 0.01
    assert gru["auc"]["vs_base"]["mean"] == pytest.approx(0.02, abs=TOL)
    assert gru["auc"]["vs_base"]["sd"] == pytest.approx(0.01, abs=TOL)
    # the reference against itself and Base against Base: exactly zero
    assert gru["auc"]["vs_reference"]["values"] == [0.0, 0.0, 0.0]
    assert base["uauc"]["vs_base"]["mean"] == 0.0


def test_aggregate_pairs_only_common_seeds():
    values = {"gru": VALUES["gru"], "attention": {1: VALUES["attention"][1],
                                                  2: VALUES["attention"][2]}}
    diff = ea.aggregate(values, reference="gru")["attention"]["auc"]["vs_reference"]
    assert diff["seeds"] == [1, 2]
    # -0.02 and 0.00: mean -0.01, sd sqrt((1e-4 + 1e-4) / 1) = sqrt(2) * 0.01
    assert diff["mean"] == pytest.approx(-0.01, abs=TOL)
    assert diff["sd"] == pytest.approx(2 ** 0.5 * 0.01, abs=TOL)
    assert "vs_base" not in ea.aggregate(values, reference="gru")["gru"]["auc"]


def test_markdown_shows_means_differences_and_seedwise_values():
    out = ea.aggregate(VALUES, reference="gru")
    text = ea.markdown(out, "gru", "python -m experiments.encoder_accuracy ...", "CELL")
    assert "| `attention` | 0.8100 ± 0.0265 | 0.7100 ± 0.0100 | -0.0100 ± 0.0100 |" in text
    assert "| `gru` | 0.8200 ± 0.0200 | 0.7200 ± 0.0200 | – | – | +0.0200 ± 0.0100 |" in text
    assert "0.7900 / 0.8000 / 0.8400" in text
    assert "-0.0100 / -0.0200 / +0.0000" in text
    assert text.index("`gru`") < text.index("Base (no generator)")


def _record(seed: int, encoder: str, auc: float, base_auc: float | None = None,
            epochs: int = 10) -> dict:
    row = {"model": "sasrec", "auc": auc, "uauc": auc - 0.01, "logloss": 0.5,
           "val_auc": auc + 0.01, "best_epoch": 7, "train_seconds": 12.5}
    rows = [{**row, "method": "duet"}]
    if base_auc is not None:
        rows.insert(0, {**row, "method": "base", "auc": base_auc, "uauc": base_auc - 0.01})
    methods = "base,duet" if base_auc is not None else "duet"
    config = {"seed": seed, "methods": methods, "generator": {"encoder": encoder},
              "train": {"num_epochs": epochs, "select_metric": "auc", "progress": False}}
    return {"rows": rows, "config": config, "environment": {"processor": "cpu"}}


def _write(root, seed, encoder, record):
    path = os.path.join(ea.cell_dir(str(root), seed, encoder), "results.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(record, f)


def test_record_matches_checks_seed_encoder_methods_and_overrides():
    rec = _record(1, "attention", 0.8)
    assert ea.record_matches(rec, 1, "attention", "gru", {"train.progress": False})
    assert not ea.record_matches(rec, 0, "attention", "gru", {})
    assert not ea.record_matches(rec, 1, "gru_bf16", "gru", {})
    assert not ea.record_matches(rec, 1, "attention", "attention", {})  # would need Base
    assert not ea.record_matches(rec, 1, "attention", "gru", {"train.num_epochs": 4})
    assert not ea.record_matches(rec, 1, "attention", "gru", {"no.such": 1})
    with pytest.raises(ValueError, match="per cell"):
        ea.parse_overrides(["seed=3"])
    assert ea.parse_overrides(["train.num_epochs=4", "train.progress=False"]) == {
        "train.num_epochs": 4, "train.progress": False}


def test_collect_only_reads_finished_cells(tmp_path):
    _write(tmp_path, 0, "gru", _record(0, "gru", 0.80, base_auc=0.78))
    _write(tmp_path, 0, "attention", _record(0, "attention", 0.79))
    _write(tmp_path, 1, "gru", _record(1, "gru", 0.82, base_auc=0.81))
    _write(tmp_path, 1, "attention", _record(1, "attention", 0.80, epochs=4))  # other budget
    cells = ea.run_grid("cfg.py", str(tmp_path), ["gru", "attention"], [0, 1], "gru",
                        ["train.num_epochs=10"], collect_only=True)
    assert [c["values"] is None for c in cells] == [False, False, False, True]
    values = ea.collect(cells, "gru")
    assert sorted(values) == ["attention", "base", "gru"]
    assert values["base"][1]["auc"] == 0.81
    assert values["attention"][0]["val_auc"] == pytest.approx(0.80, abs=TOL)
    out = ea.aggregate(values, "gru")
    assert out["attention"]["auc"]["vs_reference"]["values"] == pytest.approx([-0.01], abs=TOL)
    assert out["gru"]["auc"]["vs_base"]["mean"] == pytest.approx(0.015, abs=TOL)


def test_entry_point_collect_only_writes_report(tmp_path):
    for seed, (gru, att, base) in enumerate([(0.80, 0.79, 0.78), (0.82, 0.80, 0.81)]):
        _write(tmp_path, seed, "gru", _record(seed, "gru", gru, base_auc=base))
        _write(tmp_path, seed, "attention", _record(seed, "attention", att))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.encoder_accuracy", f"--root={tmp_path}",
         f"--out={out}", "--encoders=gru,attention", "--seeds=0,1", "--collect_only"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["missing"] == []
    # attention - gru: -0.01 and -0.02 -> mean -0.015
    diff = result["summary"]["attention"]["auc"]["vs_reference"]
    assert diff["mean"] == pytest.approx(-0.015, abs=TOL)
    assert "--collect_only" in (out / "encoder_accuracy.md").read_text()
