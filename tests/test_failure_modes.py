"""docs/failure_modes.md, case by case: each bad input or fault gives a clear error naming
the file, field or value, or a correct result; never a silently wrong one."""

import asyncio
import errno
import json
import os
import sys
import tracemalloc
import types

import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import checkpoint, delivery, files
from duet_jax.checkpoint import Checkpointer
from duet_jax.data import authors_format, datasets, raw
from duet_jax.data.samples import SampleConfig
from duet_jax.errors import ConfigError, DataError, DivergenceError, RunError
from duet_jax.paramspec import HeadSpec
from duet_jax.training import TrainConfig, divergence, train_and_evaluate
from experiments import config as config_lib
from experiments import experiment
from experiments.configs import authors_text
from tests.conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# Raw files: stale builds, truncation, published checksums, no silent download


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_a_tfds_build_is_rebuilt_when_its_raw_file_changes(tmp_path, monkeypatch):
    """The same TFDS directory, first built from one Beauty.txt, then asked for with
    another: the build follows the file, never serves the old content."""
    monkeypatch.setenv(raw.ALLOW_MODIFIED_ENV, "1")  # hand-made files, not the published one
    data, tfds_dir = tmp_path / "half", str(tmp_path / "tfds")
    _write(data / "Beauty.txt", "1 5 6\n2 7 8\n")
    first = datasets.load_records("amazon_beauty", str(data), tfds_dir)
    assert [r.user for r in first] == ["1", "2"]
    _write(data / "Beauty.txt", "1 5 6\n2 7 8\n3 9 10 11\n")
    second = datasets.load_records("amazon_beauty", str(data), tfds_dir)
    assert [r.user for r in second] == ["1", "2", "3"]
    recorded = datasets.stored_fingerprint(datasets.builder("amazon_beauty", tfds_dir))
    assert recorded["rows"] == 3 and recorded["member"] == "Beauty.txt"


def test_a_build_from_before_fingerprints_is_adopted_only_if_its_records_match(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(raw.ALLOW_MODIFIED_ENV, "1")
    data, tfds_dir = tmp_path / "raw", str(tmp_path / "tfds")
    _write(data / "Beauty.txt", "1 5 6\n2 7 8\n")
    datasets.load_records("amazon_beauty", str(data), tfds_dir)
    sidecar = os.path.join(datasets.builder("amazon_beauty", tfds_dir).data_dir,
                           datasets.FINGERPRINT_FILE)
    os.remove(sidecar)  # as a build made before fingerprints
    cls = datasets.builder_class("amazon_beauty")
    with monkeypatch.context() as m:
        def no_rebuild(self, dl_manager):
            raise AssertionError("rebuilt a build whose records match")

        m.setattr(cls, "_split_generators", no_rebuild)
        datasets.load_records("amazon_beauty", str(data), tfds_dir)
    assert json.load(open(sidecar))["rows"] == 2  # adopted
    os.remove(sidecar)
    _write(data / "Beauty.txt", "1 5 6\n2 7 9\n")
    assert datasets.load_records("amazon_beauty", str(data), tfds_dir)[1].items.tolist() == [7, 9]


def test_a_modified_copy_of_a_published_file_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv(raw.ALLOW_MODIFIED_ENV, raising=False)
    path = _write(tmp_path / "ml-100k" / "u.data", "1\t2\t3\t874724710\n")
    with pytest.raises(DataError) as err:
        datasets.prepare("movielens_100k", str(tmp_path), str(tmp_path / "tfds"))
    message = str(err.value)
    assert path in message and "not the published ml-100k/u.data" in message
    assert "100,000 rows" in message and "1 rows" in message
    assert raw.ALLOW_MODIFIED_ENV in message


def test_a_line_cut_mid_write_is_an_error_naming_file_and_line(tmp_path):
    reader = raw.RawFile("x.zip", "u.data", raw.parse_movielens)
    path = _write(tmp_path / "u.data", "1\t2\t3\t874724710\n1\t3\t4\t88")
    with pytest.raises(DataError, match=r"u.data, line 2: the last line has no line ending "
                                         r"\('1\\t3\\t4\\t88'\): the file looks truncated"):
        reader.read(str(tmp_path))
    assert path
    text = _write(tmp_path / "a.txt", "1;2;3,0;3,0;1\n1;2;3,0;3,0;")
    with pytest.raises(DataError, match=r"a.txt, line 2: the last line has no line ending"):
        authors_format.read_samples(text, seq_len=2)


def test_the_published_files_verify_and_report_what_was_read(real_data_dir):
    for name in ("movielens_100k", "douban_book"):  # douban's last line has no line ending
        fingerprint = datasets.raw_fingerprint(name, real_data_dir)
        assert fingerprint["verified"] is True
        assert fingerprint["rows"] == raw.KNOWN_FILES[fingerprint["member"]][2]


def test_a_named_data_dir_without_the_file_never_downloads(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_download(self, url):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"data: missing raw file, expected ml-100k.zip"):
        datasets.prepare("movielens_100k", str(tmp_path / "data"), str(tmp_path / "tfds"))


# ---------------------------------------------------------------------------------------------
# Sample caches and paper cells keyed by what they were made from


def _authors_files(tmp_path, flip: bool = False) -> dict[str, str]:
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for user in range(12):
        for split, count in (("train", 6), ("test", 2)):
            for _ in range(count):
                seq = ",".join(str(x) for x in rng.integers(1, 30, size=4))
                label = int(rng.integers(0, 2))
                if flip and split == "test":
                    label = 1 - label
                lines[split].append(f"{user};{rng.integers(1, 30)};{seq};{seq};{label}\n")
    return {f"{split}_file": _write(tmp_path / f"{split}.txt", "".join(text))
            for split, text in lines.items()}


def _authors_config(paths):
    config = authors_text.get_config()
    config.data.train_file, config.data.test_file = paths["train_file"], paths["test_file"]
    config.seq_len = 4
    return config


def test_an_edited_file_with_the_same_size_and_time_is_not_served_from_the_cache(tmp_path):
    paths = _authors_files(tmp_path / "in")
    config = _authors_config(paths)
    before = experiment.load_data(config, str(tmp_path / "work"))
    recorded = experiment.data_fingerprint(config)  # what a paper cell records
    stat = os.stat(paths["test_file"])
    _authors_files(tmp_path / "in", flip=True)  # every test label inverted, same size
    os.utime(paths["test_file"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = experiment.data_fingerprint(config)
    assert now["test_file"] != recorded["test_file"] and now["train_file"] == recorded["train_file"]
    after = experiment.load_data(config, str(tmp_path / "work"))
    np.testing.assert_array_equal(after.test.label, 1 - before.test.label)
    assert len(list((tmp_path / "work" / "data").glob("*.npz"))) == 2


# ---------------------------------------------------------------------------------------------
# Ids as real logs have them


def _authors_lines(users, items, rng) -> str:
    out = []
    for u in users:
        for _ in range(4):
            seq = ",".join(str(x) for x in rng.choice(items, size=5))
            out.append(f"{u};{rng.choice(items)};{seq};{seq};{int(rng.integers(0, 2))}\n")
    return "".join(out)


def test_sparse_64_bit_ids_are_renumbered_and_kept(tmp_path):
    rng = np.random.default_rng(0)
    users = [123_456_789_012, 7, 999_999_999]
    items = np.array([1_999_999_999, 99_999_999_999, 5, 2**62])
    path = _write(tmp_path / "t.txt", _authors_lines(users, items, rng))
    splits = authors_format.load_splits(path, "", path, seq_len=5)
    assert splits.num_users == 3 and splits.num_items == 4
    np.testing.assert_array_equal(splits.user_ids, sorted(users))
    np.testing.assert_array_equal(splits.item_ids, [0, *sorted(items.tolist())])
    # the original ids come back through the mapping, row by row
    text_rows = [line.split(";") for line in open(path).read().splitlines()]
    back = splits.item_ids[splits.test.target]
    assert back.tolist() == [int(r[1]) for r in text_rows]
    assert splits.user_ids[splits.test.user].tolist() == [int(r[0]) for r in text_rows]
    # dense ids stay as they are (what every existing file and cache holds)
    dense = _write(tmp_path / "d.txt", _authors_lines([0, 1, 2], np.arange(1, 9), rng))
    kept = authors_format.load_splits(dense, "", dense, seq_len=5)
    assert kept.user_ids is None and kept.item_ids is None


def test_an_id_beyond_64_bits_names_file_line_and_value(tmp_path):
    path = _write(tmp_path / "t.txt", "1;2;3,0;3,0;1\n1;99999999999999999999;3,0;3,0;1\n")
    with pytest.raises(DataError, match=r"t.txt, line 2: target 99999999999999999999 is above "
                                        r"9,223,372,036,854,775,807"):
        authors_format.read_samples(path, seq_len=2)


def _peak(path: str) -> int:
    tracemalloc.start()
    authors_format.load_splits(path, "", path, seq_len=10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_nine_digit_user_ids_cost_no_more_memory_than_dense_ids(tmp_path):
    """Peak Python-tracked memory of reading the same samples with dense user ids and with
    9-digit ones: within 1.5x (before renumbering, 9-digit ids sized arrays by the largest
    id, GiBs)."""
    rng = np.random.default_rng(0)
    users = np.arange(2000)
    text = _authors_lines(users, np.arange(1, 500), rng)
    sparse_users = {str(u): str(100_000_000 + 37 * u) for u in users}
    sparse = "".join(f"{sparse_users[line.split(';', 1)[0]]};{line.split(';', 1)[1]}\n"
                     for line in text.splitlines())
    dense_peak = _peak(_write(tmp_path / "dense.txt", text))
    sparse_peak = _peak(_write(tmp_path / "sparse.txt", sparse))
    assert sparse_peak <= 1.5 * dense_peak, (sparse_peak, dense_peak)


# ---------------------------------------------------------------------------------------------
# Configs that cannot mean what they say


@pytest.mark.parametrize("field", ["num_negatives", "eval_negatives"])
def test_zero_negatives_fail_before_any_work(field):
    config = tiny_config()
    config.data[field] = 0
    with pytest.raises(ConfigError, match=rf"config.data.{field}=0 is invalid: expected an "
                                          r"integer >= 1"):
        config_lib.validate(config)
    with pytest.raises(ConfigError):
        SampleConfig(**{field: 0})


# ---------------------------------------------------------------------------------------------
# Training: divergence, a second process, damaged checkpoints, a full disk


@pytest.fixture(scope="module")
def data():
    return experiment.load_data(tiny_config())


def _base(data):
    config = tiny_config()
    model = experiment.get_model("sasrec", config_lib.model_config(config, data.num_items))
    return experiment.build_method(config, model, "base")


def test_divergence_rules():
    val = np.array([1, 0, 0, 0, 0], np.float32)
    ok = {"train_loss": 0.5, "val": {"logloss": 0.6}}
    assert divergence([ok], 0.2, val) is None
    assert "training loss nan" in divergence([{**ok, "train_loss": float("nan")}], 0.2, val)
    assert "over 10x the first epoch's (0.5)" in divergence(
        [ok, {**ok, "train_loss": 6.0}], 0.2, val)
    assert "over 10x a constant predictor's" in divergence(
        [{**ok, "train_loss": 1.2e13}], 0.2, val)
    assert "validation logloss 80 is over 10x" in divergence(
        [{**ok, "val": {"logloss": 80.0}}], 0.2, val)


def test_a_diverging_run_stops_clearly_and_the_workdir_takes_a_lower_rate(data, tmp_path):
    bad = TrainConfig(learning_rate=1e3, num_epochs=1, batch_size=64, progress=False)
    with pytest.raises(DivergenceError) as err:
        train_and_evaluate(_base(data), data, bad, str(tmp_path), seed=0)
    message = str(err.value)
    assert message.startswith("config.train.learning_rate=1000.0 is invalid: expected a "
                              "smaller value (e.g. 100)")
    assert "validation after epoch 1" in message and "training diverged" in message
    assert os.path.isdir(tmp_path / "diverged-lr1000" / "checkpoints")
    assert not (tmp_path / "run_config.json").exists()
    good = TrainConfig(learning_rate=1e-2, num_epochs=1, batch_size=64, progress=False)
    result = train_and_evaluate(_base(data), data, good, str(tmp_path), seed=0)
    assert result.best_epoch == 1


def test_a_second_process_on_a_workdir_stops_naming_it(data, tmp_path):
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    with files.workdir_lock(tmp_path):  # another run holds it (a second lock conflicts)
        with pytest.raises(RunError, match=rf"{tmp_path} is in use by another run \(process "
                                           rf"{os.getpid()} holds"):
            train_and_evaluate(_base(data), data, config, str(tmp_path), seed=0)
    assert not (tmp_path / "run_config.json").exists()  # stopped before any work
    with files.workdir_lock(tmp_path):  # released when its holder ends
        pass


def _state(value: float):
    return {"w": jnp.full((3,), value, jnp.float32)}


def _damage(directory, step: int) -> None:
    """Overwrite every file of a saved step with garbage (a disk that lost the writes)."""
    for root, _, names in os.walk(os.path.join(directory, str(step))):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), {"step": step})
    _damage(directory, 3)
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        state, meta = ckpt.restore(_state(0))
        assert meta == {"step": 2} and float(state["w"][0]) == 2.0
        assert ckpt.latest_step() == 2
    assert "falling back to step 2" in caplog.text
    assert os.path.isdir(tmp_path / "checkpoints.corrupt" / "3")
    for step in (1, 2):
        _damage(directory, step)
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        with pytest.raises(RunError, match=rf"{directory}: no checkpoint step can be read "
                                           r"\(step 2: .*; step 1: .*\)"):
            ckpt.restore(_state(0))


def _late_callback_error() -> RuntimeError:
    """What a tensorstore read of a failed restore raises when it finishes: asyncio
    refusing ``call_soon_threadsafe`` on the loop orbax has already closed."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as err:
        return err
    raise AssertionError("a closed loop accepted a callback")


def _unraisable(err: BaseException):
    return types.SimpleNamespace(exc_type=type(err), exc_value=err,
                                 exc_traceback=err.__traceback__, err_msg=None, object=None)


def test_checkpoints_silence_only_the_late_callbacks_of_closed_loops(tmp_path, monkeypatch):
    late = _late_callback_error()
    assert checkpoint.is_late_callback_of_closed_loop(late)
    same_words = RuntimeError("Event loop is closed")  # raised elsewhere: not recognised
    assert not checkpoint.is_late_callback_of_closed_loop(same_words)
    assert not checkpoint.is_late_callback_of_closed_loop(ValueError("Event loop is closed"))

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # restored after the test
    directory = str(tmp_path / "checkpoints")
    for step in (1, 2):  # wrapped once, however many checkpointers open
        with Checkpointer(directory) as ckpt:
            ckpt.save(step, _state(1.0), {"step": step})
    hook = sys.unraisablehook
    assert hook != seen.append and hook.__closure__ is not None
    assert not any(getattr(cell.cell_contents, "_duet_drops_late_callbacks", False)
                   for cell in hook.__closure__)
    hook(_unraisable(late))
    assert seen == []  # dropped
    other = ValueError("a real problem")
    hook(_unraisable(same_words))
    hook(_unraisable(other))
    assert [u.exc_value for u in seen] == [same_words, other]  # handed on, in order


def test_a_damaged_step_has_no_readable_metadata(tmp_path):
    directory = str(tmp_path / "checkpoints")
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, _state(1.0), {"step": 1})
        assert ckpt.state_metadata(1)["w"].shape == (3,)
    _damage(directory, 1)
    with Checkpointer(directory) as ckpt, pytest.raises(
            ValueError, match="step 1 has no readable metadata of its state"):
        ckpt.state_metadata(1)


def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "result.json"
    files.write_text_atomic(target, "old\n")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(RunError, match=rf"{target}: no space left on the device"):
            files.write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["result.json"]

    # orbax writes through tensorstore (C++), out of Python's reach: simulate its failure
    # the way it surfaces, an error raised from the OSError of the full disk
    import orbax.checkpoint as ocp

    directory = str(tmp_path / "checkpoints")
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, _state(1.0), {"step": 1})

        def save(self, step, *args, **kwargs):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as err:
                raise ValueError("tensorstore write failed") from err

        with monkeypatch.context() as m:
            m.setattr(ocp.CheckpointManager, "save", save)
            with pytest.raises(RunError, match=r"checkpoints/2: no space left on the device"):
                ckpt.save(2, _state(2.0), {"step": 2})
    with Checkpointer(directory) as ckpt:
        state, meta = ckpt.restore(_state(0))
    assert meta == {"step": 1} and float(state["w"][0]) == 1.0


# ---------------------------------------------------------------------------------------------
# Delivery


def test_int8_delivery_refuses_a_non_finite_leaf_naming_it():
    head = {"dense": {"kernel": np.ones((2, 3, 2), np.float32), "bias": np.zeros((2, 2),
                                                                                  np.float32)}}
    head["dense"]["kernel"][1, 2, 0] = np.inf
    spec = HeadSpec.of({"dense": {"kernel": np.zeros((3, 2), np.float32),
                                  "bias": np.zeros(2, np.float32)}})
    with pytest.raises(ValueError, match=r"head leaf 'dense/kernel' of device \(1,\) holds inf "
                                         r"at \(2, 0\)"):
        delivery.encode(spec, head, "int8")
    delivery.encode(spec, head, "float32")  # float formats carry inf as it is
