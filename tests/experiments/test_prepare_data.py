"""prepare_data as a user runs it, on the real MovieLens-100K files."""

import json

import pytest

from duet_jax.data import datasets
from experiments import experiment
from experiments.configs.movielens_100k import get_config
from tests.experiments.test_main import run_module

BUILD = ("duet_movielens_100k", "1.0.0", "dataset_info.json")


@pytest.fixture(autouse=True)
def _tfds_data_dir(tmp_path, monkeypatch):
    """Every run here builds under tmp_path/env ($TFDS_DATA_DIR), never in the home dir."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))


def _prepare(*args):
    return run_module("experiments.prepare_data", *args)


def test_prepare_writes_stats_and_caches_samples(real_data_dir, tmp_path, monkeypatch):
    run = _prepare("--dataset=movielens_100k", f"--data_dir={real_data_dir}", f"--out={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    # no --tfds_dir and no config.data.tfds_dir: the build goes to $TFDS_DATA_DIR
    assert (tmp_path / "env").joinpath(*BUILD).is_file()
    assert not (tmp_path / "tfds").exists()
    assert f"TFDS data directory: {tmp_path / 'env'}" in run.stdout
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["raw_users"], stats["raw_items"], stats["raw_interactions"]) == (
        943,
        1682,
        100_000,
    )
    assert stats["users"] == 943 and stats["interactions"] <= 100_000
    # what was read, and that it is GroupLens's published u.data
    assert stats["raw_member"] == "ml-100k/u.data" and stats["raw_rows"] == 100_000
    assert stats["raw_verified"] is True and stats["raw_sha256"].startswith("06416e597f82")
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
    _main_job_reuses_the_build(real_data_dir, monkeypatch)


def _main_job_reuses_the_build(real_data_dir, monkeypatch):
    """The main job's data path (experiment.load_data with the dataset config, no cache),
    under the same $TFDS_DATA_DIR, reads prepare_data's build instead of generating it."""

    def no_rebuild(self, dl_manager):
        raise AssertionError("the main job generated the dataset again")

    monkeypatch.setattr(datasets.builder_class("movielens_100k"), "_split_generators", no_rebuild)
    config = get_config()
    config.data.data_dir = real_data_dir
    assert experiment.load_data(config).info["dataset"] == "movielens_100k"


def test_tfds_dir_flag_and_config_field_come_before_the_environment(
    real_data_dir, tmp_path, monkeypatch
):
    common = ("--dataset=movielens_100k", f"--data_dir={real_data_dir}", f"--out={tmp_path}")
    run = _prepare(
        *common, f"--tfds_dir={tmp_path / 'flag'}", f"--config.data.tfds_dir={tmp_path / 'cfg'}"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "flag").joinpath(*BUILD).is_file()
    assert not (tmp_path / "cfg").exists() and not (tmp_path / "env").exists()
    # the main job honours config.data.tfds_dir the same way, before $TFDS_DATA_DIR
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "flag"))
    config = get_config()
    config.data.data_dir = real_data_dir
    config.data.tfds_dir = str(tmp_path / "cfg")
    experiment.load_data(config)
    assert (tmp_path / "cfg").joinpath(*BUILD).is_file()


def test_missing_raw_files_fail_with_a_clear_message(tmp_path):
    run = _prepare("--dataset=amazon_beauty", f"--data_dir={tmp_path}", f"--out={tmp_path / 'o'}")
    assert run.returncode != 0
    assert "missing raw file, expected amazon_s3rec_5core.zip or Beauty.txt" in run.stderr
    assert not (tmp_path / "o" / "stats.json").exists()
