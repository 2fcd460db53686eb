"""The builders used the plain TFDS way (tfds.builder / tfds.data_source), without TensorFlow,
on the real MovieLens-100K files."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

from duet_jax.data import tfds_builders

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "duet_movielens_100k"

# What a user types, in a fresh interpreter: only `import duet_jax.data` registers the builder.
_USER_SCRIPT = """
import json, sys
import tensorflow_datasets as tfds
import duet_jax.data

data_dir, manual_dir = sys.argv[1:]
builder = tfds.builder("duet_movielens_100k", data_dir=data_dir)
builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
train = tfds.data_source("duet_movielens_100k", data_dir=data_dir, split="train")
print(json.dumps({
    "format": builder.info.file_format.value,
    "records": len(train),
    "interactions": sum(len(r["items"]) for r in train),
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""


def test_plain_tfds_calls_build_and_read_without_tensorflow(real_data_dir, tmp_path):
    manual = os.path.join(real_data_dir, "movielens-100k")
    run = subprocess.run(
        [sys.executable, "-c", _USER_SCRIPT, str(tmp_path / "tfds"), manual],
        cwd=tmp_path,  # not the repository: the installed package is what registers
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # 943 users and 100,000 ratings: the published MovieLens-100K counts
    assert out == {
        "format": "array_record",
        "records": 943,
        "interactions": 100_000,
        "tensorflow_imported": False,
    }
    version_dir = tmp_path / "tfds" / NAME / "1.0.0"
    assert list(version_dir.glob(f"{NAME}-train.array_record-*"))
    assert not list(version_dir.glob("*tfrecord*"))


def test_data_source_records_equal_the_raw_file(real_data_dir, tmp_path):
    data_dir = str(tmp_path / "tfds")
    manual = os.path.join(real_data_dir, "movielens-100k")
    tfds.builder(NAME, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual)
    )
    train = tfds.data_source(NAME, data_dir=data_dir, split="train")
    stored = {r["user"].decode(): r for r in train}
    raw = tfds_builders.DuetMovielens100k.RAW.read(manual)
    assert sorted(stored) == sorted(r.user for r in raw)
    for record in raw:
        got = stored[record.user]
        for field in ("items", "timestamps", "ratings"):
            np.testing.assert_array_equal(got[field], getattr(record, field))


def test_an_explicit_file_format_is_still_honoured(tmp_path):
    builder = tfds.builder(NAME, data_dir=str(tmp_path), file_format="tfrecord")
    assert builder.info.file_format == tfds.core.FileFormat.TFRECORD
    assert tfds.builder(NAME, data_dir=str(tmp_path)).info.file_format == (
        tfds.core.FileFormat.ARRAY_RECORD
    )


def test_every_builder_is_registered_and_defaults_to_array_record(tmp_path):
    for cls in tfds_builders.BUILDERS.values():
        assert tfds.builder_cls(cls.name) is cls
        assert cls(data_dir=str(tmp_path)).info.file_format == tfds.core.FileFormat.ARRAY_RECORD
