"""prepare_data as a user runs it, on the real MovieLens-100K files."""

import json

from tests.experiments.test_main import run_module


def _prepare(*args):
    return run_module("experiments.prepare_data", *args)


def test_prepare_writes_stats_and_caches_samples(real_data_dir, tmp_path):
    run = _prepare("--dataset=movielens_100k", f"--data_dir={real_data_dir}", f"--out={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["raw_users"], stats["raw_items"], stats["raw_interactions"]) == (
        943,
        1682,
        100_000,
    )
    assert stats["users"] == 943 and stats["interactions"] <= 100_000
    for split in ("train", "val", "test"):
        assert (
            stats[f"{split}_samples"] == stats[f"{split}_positives"] + stats[f"{split}_negatives"]
        )
    assert stats["test_negatives"] == 4 * stats["test_positives"]
    assert "raw_interactions: 100000" in run.stdout
    cached = list((tmp_path / "data").glob("movielens_100k-*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = _prepare(
        "--dataset=movielens_100k",
        f"--data_dir={real_data_dir}",
        f"--out={tmp_path}",
        "--config.data.user_core=5",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert cached[0].stat().st_mtime_ns == mtime  # same protocol: loaded, not rebuilt
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_missing_raw_files_fail_with_a_clear_message(tmp_path):
    run = _prepare("--dataset=amazon_beauty", f"--data_dir={tmp_path}", f"--out={tmp_path / 'o'}")
    assert run.returncode != 0
    assert "missing raw file, expected amazon_s3rec_5core.zip or Beauty.txt" in run.stderr
    assert not (tmp_path / "o" / "stats.json").exists()
