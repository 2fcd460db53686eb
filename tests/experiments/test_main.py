"""The main job as a user runs it: a subprocess with command-line overrides."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--config.data.num_users=60",
    "--config.data.num_items=120",
    "--config.data.num_categories=6",
    "--config.data.num_styles=3",
    "--config.data.cloud_len=(10,12)",
    "--config.data.device_len=(3,4)",
    "--config.embed_dim=8",
    "--config.seq_len=8",
    "--config.sasrec.num_heads=2",
    "--config.din.hidden=(16,8)",
    "--config.train.batch_size=64",
    "--config.train.num_epochs=1",
    "--config.train.progress=False",
]
ROW_KEYS = {
    "model",
    "method",
    "auc",
    "uauc",
    "logloss",
    "ndcg@5",
    "hr@5",
    "recall@5",
    "ndcg@10",
    "hr@10",
    "recall@10",
    "ndcg@20",
    "hr@20",
    "recall@20",
    "seed",
}


def _no_nan(token):
    raise AssertionError(f"results.json holds {token}: not strict JSON")


def run_module(module: str, *args, cwd=ROOT, timeout: int = 600):
    """``python -m module args`` from the repository, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(*args, cwd=ROOT, timeout: int = 600):
    return run_module("experiments.main", *args, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("model", ["sasrec", pytest.param("din", marks=pytest.mark.slow)])
def test_main_job_writes_results(model, tmp_path):
    run = _main(
        "--config=experiments/configs/synthetic.py",
        f"--workdir={tmp_path}",
        f"--config.model={model}",
        *TINY,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=_no_nan)
    rows = results["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [(model, "base"), (model, "duet")]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert 0.0 <= row["auc"] <= 1.0 and row["seed"] == 0
    assert results["config"]["model"] == model
    assert results["environment"]["versions"]["jax"]
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert ROW_KEYS <= set(header)
    table = (tmp_path / "results.md").read_text()
    assert "| model | method | auc |" in table and table in run.stdout


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_defaults_need_no_flags_and_rerun_resumes(tmp_path):
    """No --config and no --workdir: synthetic config, workdir under the current directory."""
    first = _main(*TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    workdir = tmp_path / "runs" / "synthetic" / "sasrec"
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    checkpoints = {p: p.stat().st_mtime_ns for p in workdir.glob("*/checkpoints/*")}
    assert {p.parent.parent.name for p in checkpoints} == {"base", "duet"}
    again = _main(*TINY, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    # the same numbers, bitwise: restored parameters, the same code on the same machine
    # (adaptation times are measured again, so they may differ)
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "adapt_ms_per_device"} for r in rs]
    assert untimed(json.loads((workdir / "results.json").read_text())["rows"]) == untimed(rows)
    # nothing was retrained: no checkpoint was written or rewritten
    assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/checkpoints/*")} == checkpoints


@pytest.mark.slow  # ~45 s; tests/test_training.py checks the same rule on the library
def test_a_larger_budget_continues_a_finished_run(tmp_path):
    """num_epochs 1 -> 2 on a finished workdir trains one more epoch and ends where a run
    started with 2 epochs ends (bitwise: same code, same machine, same batches); changing
    only cosmetic fields does not block it."""
    short = [a for a in TINY if "num_epochs" not in a]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    for args in ((f"--workdir={extended}", "--config.train.num_epochs=1"),
                 (f"--workdir={extended}", "--config.train.num_epochs=2",
                  "--config.train.checkpoint_every_steps=7"),
                 (f"--workdir={fresh}", "--config.train.num_epochs=2")):
        run = _main(*short, *args)
        assert run.returncode == 0, run.stderr[-3000:]
    untimed = lambda rs: [{k: v for k, v in r.items()
                           if k not in ("adapt_ms_per_device", "train_seconds")} for r in rs]
    rows = lambda d: untimed(json.loads((d / "results.json").read_text())["rows"])
    assert rows(extended) == rows(fresh)
    for method in ("base", "duet"):
        lines = (extended / method / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # a changed learning rate is refused, naming that field and nothing else
    bad = _main(*short, f"--workdir={extended}", "--config.train.num_epochs=2",
                "--config.train.learning_rate=0.01")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "config.train.learning_rate" in bad.stderr
    assert "num_epochs" not in bad.stderr.split("learning_rate", 1)[1]


def test_bad_override_fails_naming_the_field(tmp_path):
    run = _main(f"--workdir={tmp_path}", *TINY, "--config.seq_len=0")
    assert run.returncode == 2
    assert "error: config.seq_len=0 is invalid" in run.stderr
    assert "Traceback" not in run.stderr  # a user error is one line, not a stack
    assert not (tmp_path / "results.json").exists()


def real_tiny(real_data_dir, tmp_path) -> list[str]:
    """Flags for a one-epoch run on real data with a small model, built under ``tmp_path``."""
    return [
        f"--workdir={tmp_path}",
        f"--config.data.data_dir={real_data_dir}",
        f"--config.data.tfds_dir={tmp_path / 'tfds'}",
        "--config.embed_dim=8",
        "--config.seq_len=8",
        "--config.sasrec.num_heads=2",
        "--config.train.num_epochs=1",
        "--config.train.progress=False",
    ]


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_main_job_runs_on_real_movielens(real_data_dir, tmp_path):
    run = _main("--config=experiments/configs/movielens_100k.py",
                *real_tiny(real_data_dir, tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["base", "duet"]
    assert all(r["dataset"] == "movielens_100k" and r["auc"] > 0.6 for r in results["rows"])
    assert results["data"]["raw_interactions"] == 100_000
    assert list((tmp_path / "data").glob("movielens_100k-*.npz"))


def test_default_workdir_keeps_config_variants_apart():
    from experiments.main import default_workdir

    assert default_workdir("experiments/configs/synthetic.py", "din") == "runs/synthetic/din"
    assert default_workdir("experiments/configs/amazon_cds.py:quick", "sasrec") == (
        "runs/amazon_cds_quick/sasrec"
    )
