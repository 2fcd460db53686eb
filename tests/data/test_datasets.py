"""Every real dataset built with TFDS from DUET_DATA_DIR: counts, order, no leakage,
negatives, determinism, where the build goes, that it is built once, and no partial build
after a failure."""

import concurrent.futures
import contextlib
import errno
import glob
import os
import threading
import time

import numpy as np
import pytest

from duet_jax.data import datasets, raw
from duet_jax.data.protocol import ProtocolConfig, build_dataset_samples
from duet_jax.data.samples import SampleConfig
from duet_jax.errors import DataError

# raw counts measured on the files in DUET_DATA_DIR (its MANIFEST.md; MovieLens-100K's match
# the published numbers): users, items, interactions
MANIFEST_COUNTS = {
    "movielens_100k": (943, 1682, 100_000),
    "amazon_cds": (17_052, 35_118, 472_265),
    "amazon_beauty": (22_363, 12_101, 198_502),
    "amazon_sports": (35_598, 18_357, 296_337),
    "amazon_toys": (19_412, 11_924, 167_597),
    "douban_book": (2_110, 6_777, 96_041),
}


@pytest.fixture(scope="module")
def built(real_data_dir, tfds_dir):
    return {name: datasets.load_records(name, real_data_dir, tfds_dir) for name in MANIFEST_COUNTS}


def test_every_dataset_has_a_builder_and_a_manifest_count():
    assert set(datasets.BUILDERS) == set(MANIFEST_COUNTS)


@pytest.mark.parametrize("name", sorted(MANIFEST_COUNTS))
def test_raw_counts_match_the_manifest(built, name):
    records = built[name]
    items = np.concatenate([r.items for r in records])
    assert (len(records), len(np.unique(items)), len(items)) == MANIFEST_COUNTS[name]


def test_movielens_records_are_chronological_and_complete(built):
    records = built["movielens_100k"]
    assert all((np.diff(r.timestamps) >= 0).all() for r in records)
    ts = np.concatenate([r.timestamps for r in records])
    assert (ts.min(), ts.max()) == (874724710, 893286638)  # the data's MANIFEST.md
    assert min(len(r.items) for r in records) >= 20
    assert [r.user for r in records] == [str(u) for u in range(1, 944)]


def test_sequence_datasets_keep_the_file_order(built, real_data_dir):
    # first line of Beauty.txt: "1 1 2 3 4 5"; user 2: "2 6 7 8 9 10 4 11"
    beauty = {r.user: r.items.tolist() for r in built["amazon_beauty"][:2]}
    assert beauty == {"1": [1, 2, 3, 4, 5], "2": [6, 7, 8, 9, 10, 4, 11]}
    cds = built["amazon_cds"][0]
    assert cds.user == "0" and cds.items[:3].tolist() == [19424, 1824, 4592]


def _positions(sequences):
    """Sorted keys ``user * M + item`` -> position of that item in the user's sequence."""
    m = max(int(s.max()) for s in sequences) + 1
    keys = np.concatenate([u * m + s for u, s in enumerate(sequences)])
    pos = np.concatenate([np.arange(len(s)) for s in sequences])
    order = np.argsort(keys)
    return m, keys[order], pos[order]


@pytest.mark.parametrize("name", sorted(MANIFEST_COUNTS))
def test_device_test_has_no_leakage_and_negatives_are_untouched(built, name):
    from duet_jax.data.protocol import prepare_sequences

    protocol, samples = ProtocolConfig(), SampleConfig()
    seqs = prepare_sequences(built[name], protocol, name)
    splits, _ = build_dataset_samples(built[name], protocol, samples, seed=0, dataset=name)
    m, keys, pos = _positions(seqs.sequences)

    def lookup(user, item):
        k = user.astype(np.int64) * m + item
        i = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
        return np.where(keys[i] == k, pos[i], -1)

    test = splits.test
    positive = test.label == 1
    u, target = test.user[positive], test.target[positive]
    t = lookup(u, target)
    assert (t >= seqs.test_start[u]).all()  # every positive is a device-test position
    click = test.click_seq[positive]
    valid = click > 0
    hist = lookup(np.repeat(u, click.shape[1]).reshape(click.shape), click)
    # history: only items the user had strictly before the target, never the target itself
    assert (hist[valid] >= 0).all()
    assert (hist < t[:, None])[valid].all()
    assert not (click == target[:, None]).any()
    # and it is exactly the latest seq_len items before the target
    lengths = np.minimum(t, samples.seq_len)
    np.testing.assert_array_equal(valid.sum(axis=1), lengths)
    np.testing.assert_array_equal(hist[:, 0][lengths > 0], (t - lengths)[lengths > 0])
    for split in (splits.train, splits.val, splits.test):
        negative = split.label == 0
        assert (lookup(split.user[negative], split.target[negative]) == -1).all()


def test_second_build_is_byte_identical(real_data_dir, tmp_path):
    name = "movielens_100k"
    for run in ("a", "b"):
        datasets.prepare(name, real_data_dir, str(tmp_path / run))
    files = sorted(glob.glob(str(tmp_path / "a" / "**" / "*.array_record*"), recursive=True))
    assert files
    for path in files:
        other = path.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert open(path, "rb").read() == open(other, "rb").read()
    splits = [
        build_dataset_samples(
            datasets.load_records(name, real_data_dir, str(tmp_path / run)),
            ProtocolConfig(),
            SampleConfig(),
            seed=3,
            dataset=name,
        )[0]
        for run in ("a", "b")
    ]
    assert splits[0].fingerprint() == splits[1].fingerprint()


def _files(root) -> dict[str, int]:
    """Every file under ``root`` -> its mtime in ns."""
    return {
        os.path.relpath(p, root): os.stat(p).st_mtime_ns
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(p)
    }


def test_tfds_dir_falls_back_to_tfds_data_dir_then_the_tfds_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    assert datasets.tfds_data_dir(str(tmp_path / "given")) == str(tmp_path / "given")
    assert datasets.tfds_data_dir(None) == str(tmp_path / "env")
    assert datasets.tfds_data_dir("") == str(tmp_path / "env")
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.tfds_data_dir(None) == str(tmp_path / "home" / "tensorflow_datasets")


def test_build_splits_builds_in_tfds_data_dir_once(real_data_dir, tmp_path, monkeypatch):
    """No tfds_dir given: the build goes to $TFDS_DATA_DIR (read when called, not when TFDS
    was imported); a second call reuses it without generating anything or rewriting a file,
    and without needing the raw files any more."""
    env_dir = str(tmp_path / "env")
    monkeypatch.setenv("TFDS_DATA_DIR", env_dir)
    first = datasets.build_splits(
        "movielens_100k", ProtocolConfig(), SampleConfig(), 0, real_data_dir
    )
    assert os.path.isfile(
        os.path.join(env_dir, "duet_movielens_100k", "1.0.0", "dataset_info.json")
    )
    before = _files(env_dir)
    assert any(".array_record-" in p for p in before)

    def no_rebuild(self, dl_manager):
        raise AssertionError("the dataset was generated a second time")

    cls = datasets.builder_class("movielens_100k")
    monkeypatch.setattr(cls, "_split_generators", no_rebuild)
    monkeypatch.delenv("DUET_DATA_DIR", raising=False)
    second = datasets.build_splits(
        "movielens_100k", ProtocolConfig(), SampleConfig(), 0, str(tmp_path / "gone")
    )
    assert second.fingerprint() == first.fingerprint()
    assert _files(env_dir) == before
    # the plain TFDS call on the same directory reuses it too
    import tensorflow_datasets as tfds

    tfds.builder("duet_movielens_100k", data_dir=env_dir).download_and_prepare()
    assert _files(env_dir) == before


def test_failed_build_leaves_no_dataset_and_a_fixed_build_works(
    tmp_path, real_data_dir, monkeypatch
):
    monkeypatch.setenv(raw.ALLOW_MODIFIED_ENV, "1")  # a hand-made u.data, not GroupLens's
    raw_dir = tmp_path / "raw" / "movielens-100k"
    raw_dir.mkdir(parents=True)
    (raw_dir / "u.data").write_text("1\t2\t3\t874724710\n1\t3\t4\tnoon\n")
    tfds_dir = str(tmp_path / "tfds")
    with pytest.raises(DataError, match=r"u.data, line 2: timestamp .* 'noon' is not an integer"):
        datasets.prepare("movielens_100k", str(tmp_path / "raw"), tfds_dir)
    leftovers = [p for p in glob.glob(os.path.join(tfds_dir, "duet_movielens_100k", "*"))]
    assert leftovers == []  # no version dir, no incomplete.* dir
    (raw_dir / "u.data").write_text("1\t2\t3\t874724710\n1\t3\t4\t874724711\n")
    records = datasets.load_records("movielens_100k", str(tmp_path / "raw"), tfds_dir)
    assert records[0].items.tolist() == [2, 3]


def test_concurrent_builds_of_one_dataset_take_turns(tmp_path, real_data_dir, monkeypatch):
    """Two callers preparing the same dataset into one empty TFDS directory (two grid
    workers started together): one builds, the other waits and reuses the build. Without
    the lock both generate, and the second TFDS rename fails with FileExistsError."""
    cls = datasets.builder_class("movielens_100k")
    original = cls._split_generators
    lock = threading.Lock()
    inside, most_inside, generated = [0], [0], []

    def slow_generation(self, dl_manager):
        with lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
            generated.append(threading.get_ident())
        time.sleep(1.0)  # long enough for the other caller to arrive meanwhile
        with lock:
            inside[0] -= 1
        return original(self, dl_manager)

    monkeypatch.setattr(cls, "_split_generators", slow_generation)
    tfds_dir = str(tmp_path / "tfds")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(datasets.load_records, "movielens_100k", real_data_dir, tfds_dir)
                   for _ in range(2)]
        first, second = (f.result(timeout=300) for f in futures)
    assert most_inside[0] == 1 and len(generated) == 1  # built once, by one caller
    assert [r.user for r in first] == [r.user for r in second]
    assert all(np.array_equal(a.items, b.items) for a, b in zip(first, second, strict=True))


def test_a_tfds_directory_without_write_access_is_read_without_the_lock(
        tmp_path, real_data_dir, monkeypatch):
    tfds_dir = str(tmp_path / "tfds")
    built_records = datasets.load_records("movielens_100k", real_data_dir, tfds_dir)

    def refused(errno_value):
        @contextlib.contextmanager
        def lock(directory, wait=False):
            raise OSError(errno_value, os.strerror(errno_value), directory)
            yield

        return lock

    # a shared, read-only build (as root, chmod would not stop this test's writes)
    monkeypatch.setattr(datasets.files, "workdir_lock", refused(errno.EROFS))
    records = datasets.load_records("movielens_100k", real_data_dir, tfds_dir)
    assert [r.user for r in records] == [r.user for r in built_records]
    # any other failure to take the lock is not swallowed
    monkeypatch.setattr(datasets.files, "workdir_lock", refused(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"):
        datasets.load_records("movielens_100k", real_data_dir, tfds_dir)


def test_missing_data_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DUET_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"'douban_book' needs its raw files: set DUET_DATA_DIR"):
        datasets.load_records("douban_book", None, str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"data directory .*absent does not exist"):
        datasets.load_records("amazon_cds", str(tmp_path / "absent"), str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"missing raw file, expected amazon_cds_hgn_text.zip"):
        datasets.load_records("amazon_cds", str(tmp_path), str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"unknown dataset 'netflix'"):
        datasets.load_records("netflix", str(tmp_path))


def test_movielens_downloads_from_grouplens_when_no_copy_is_given(tmp_path, monkeypatch):
    """No DUET_DATA_DIR and no data_dir: the builder asks TFDS for the official archive
    (network faked here), whose size and sha256 are registered in checksums.tsv."""
    import tensorflow_datasets as tfds

    extracted = tmp_path / "extracted"
    (extracted / "ml-100k").mkdir(parents=True)
    (extracted / "ml-100k" / "u.data").write_text("7\t3\t4\t100\n7\t2\t5\t50\n")
    asked = []

    def fake_download_and_extract(self, url):
        asked.append(url)
        return extracted

    monkeypatch.delenv("DUET_DATA_DIR", raising=False)
    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", fake_download_and_extract
    )
    records = datasets.load_records("movielens_100k", None, str(tmp_path / "tfds"))
    url = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert asked == [url]
    assert records[0].user == "7" and records[0].items.tolist() == [2, 3]
    info = datasets.builder_class("movielens_100k").url_infos[url]
    assert info.size == 4_924_029
    assert info.checksum.startswith("50d2a982c66986937beb")
