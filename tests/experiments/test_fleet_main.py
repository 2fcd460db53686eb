"""The fleet job as a user runs it: ``python -m experiments.fleet`` in a subprocess."""

import json

import pytest

from tests.experiments.test_main import TINY, _no_nan, real_tiny, run_module

FLEET_TINY = [*TINY, "--config.fleet.num_rounds=3", "--config.fleet.progress=False",
              "--config.fleet.min_bucket=8"]
PNG = b"\x89PNG\r\n\x1a\n"


def _fleet(*args):
    return run_module("experiments.fleet", *args)


def test_fleet_job_writes_records_totals_table_and_plots(tmp_path):
    run = _fleet(f"--workdir={tmp_path}", *FLEET_TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "fleet.json").read_text(), parse_constant=_no_nan)
    policies = ["every_round", "every_k_items", "drift_threshold", "never"]
    formats = ["float32", "bfloat16", "int8"]
    keys = [(t["policy"], t["format"]) for t in out["totals"]]
    assert keys == [(p, f) for p in policies for f in formats] + [("base", "static")]
    assert len(out["records"]) == (len(policies) * len(formats) + 1) * 3
    totals = {k: t for k, t in zip(keys, out["totals"], strict=True)}
    devices = out["fleet"]["devices"]
    assert devices == 60 == totals["never", "int8"]["requests"]  # one sync each, all users
    for t in out["totals"]:
        assert 0.0 <= t["auc"] <= 1.0 and t["samples"] == out["fleet"]["samples"]
    # bytes down scale with the format's width; the request schedule does not change
    every = {f: totals["every_round", f] for f in formats}
    assert every["float32"]["bytes_down"] == 2 * every["bfloat16"]["bytes_down"]
    assert len({e["requests"] for e in every.values()}) == 1
    assert totals["every_round", "float32"]["requests"] >= totals["every_k_items", "float32"][
        "requests"] >= devices
    assert totals["base", "static"]["bytes_down"] == 0
    assert [u["upload"] for u in out["uploads"]] == ["ids", "z"]
    ft = out["finetune"]  # what fine-tuning the same devices would cost instead
    assert ft["devices"] == devices and ft["params"] == "head"
    assert sorted(ft["seconds_per_device"], key=int) == ["1", "5", "20", "50"]
    assert all(v > 0 for v in ft["seconds_per_device"].values())
    assert "On-device fine-tuning instead" in (tmp_path / "fleet.md").read_text()
    assert out["environment"]["versions"]["jax"] and out["config"]["fleet"]["num_rounds"] == 3
    assert set(out["training"]) == {"base", "duet"}
    table = (tmp_path / "fleet.md").read_text()
    assert "| policy | format | requests/device |" in table and table in run.stdout
    for name in ("fleet_auc_rounds.png", "fleet_bytes_auc.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_changing_fleet_fields_reuses_training_and_is_deterministic(tmp_path):
    only = ["--config.fleet.policies=never", "--config.fleet.formats=int8"]
    first = _fleet(f"--workdir={tmp_path}", *FLEET_TINY, *only)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = {p: p.stat().st_mtime_ns for p in tmp_path.glob("train/*/checkpoints/*")}
    assert {p.parent.parent.name for p in checkpoints} == {"base", "duet"}
    before = json.loads((tmp_path / "fleet.json").read_text())
    again = _fleet(f"--workdir={tmp_path}", *FLEET_TINY, *only, "--config.fleet.upload=z")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("train/*/checkpoints/*")} == (
        checkpoints
    )  # nothing retrained
    after = json.loads((tmp_path / "fleet.json").read_text())
    aucs = lambda out: {(t["policy"], t["format"]): t["auc"] for t in out["totals"]}
    assert aucs(after) == aucs(before)  # same heads from z as from ids, same scores
    z = next(t for t in after["totals"] if t["policy"] == "never")
    assert z["bytes_up_per_device"] == 4 * 32  # z upload: Z float32 values per request


def test_bad_fleet_field_fails_before_any_work(tmp_path):
    run = _fleet(f"--workdir={tmp_path}", *FLEET_TINY, "--config.fleet.policies=sometimes")
    assert run.returncode != 0
    assert "config.fleet.policies='sometimes' is invalid" in run.stderr
    assert not (tmp_path / "train").exists() and not (tmp_path / "fleet.json").exists()


@pytest.mark.slow
def test_fleet_job_runs_on_real_movielens(real_data_dir, tmp_path):
    run = _fleet(
        "--config=experiments/configs/fleet.py:movielens_100k",
        *real_tiny(real_data_dir, tmp_path),
        "--config.fleet.num_devices=200",
        "--config.fleet.num_rounds=4",
        "--config.fleet.formats=float32,int8",
        "--config.fleet.progress=False",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "fleet.json").read_text())
    assert out["fleet"]["devices"] == 200 and out["data"]["raw_interactions"] == 100_000
    assert all(t["auc"] > 0.6 for t in out["totals"])  # real signal on real data


@pytest.mark.slow
def test_default_fleet_job(tmp_path):
    """The README's fleet command: adapting beats the stale first-sync head."""
    run = _fleet(f"--workdir={tmp_path}", "--config.train.progress=False",
                 "--config.fleet.progress=False")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "fleet.json").read_text())
    auc = {(t["policy"], t["format"]): t["auc"] for t in out["totals"]}
    assert out["fleet"]["devices"] == 3000
    assert auc["every_round", "float32"] > auc["never", "float32"] + 0.02
    assert abs(auc["every_round", "int8"] - auc["every_round", "float32"]) < 0.002
