"""The real datasets by name: find their raw files, build them with TFDS, read them back.

    records = load_records("movielens_100k", data_dir=os.environ["DUET_DATA_DIR"])

``data_dir`` may be the root that holds every dataset's directory (``DUET_DATA_DIR``, e.g.
``.../data`` with ``movielens-100k/`` inside) or the dataset's own directory. The TFDS
build goes to ``tfds_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (read at
call time: TFDS itself reads the variable once, when it is imported), and is built once:
a later call with the same directory finds it prepared and reads it without looking at the
raw files. TFDS writes a build under a temporary name and renames it when complete, so a
failed build leaves nothing a later call would pick up.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from duet_jax.data.protocol import ProtocolConfig, build_dataset_samples
from duet_jax.data.raw import UserRecord
from duet_jax.data.samples import SampleConfig, Splits
from duet_jax.data.tfds_builders import BUILDERS, InteractionSequences
from duet_jax.errors import DataError

DATA_DIR_ENV = "DUET_DATA_DIR"
TFDS_DIR_ENV = "TFDS_DATA_DIR"


def builder_class(name: str) -> type[InteractionSequences]:
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}: expected one of {sorted(BUILDERS)}")
    return BUILDERS[name]


def raw_dir(name: str, data_dir: str | None = None) -> str | None:
    """The dataset's raw directory: ``data_dir/<subdir>`` if that exists, else ``data_dir``
    itself; ``$DUET_DATA_DIR/<subdir>`` when ``data_dir`` is empty. None when neither is
    given (then only a downloadable dataset can be built)."""
    cls = builder_class(name)
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        if cls.DOWNLOAD_URL is None:
            raise DataError(
                f"dataset {name!r} needs its raw files: set {DATA_DIR_ENV} or pass a data "
                f"directory. {cls.manual_instructions()}"
            )
        return None
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist (dataset {name!r})")
    nested = os.path.join(data_dir, cls.SUBDIR)
    candidate = nested if os.path.isdir(nested) else data_dir
    if not cls.RAW.exists(candidate) and cls.DOWNLOAD_URL is None:
        cls.RAW.read(candidate)  # raises DataError naming the files it expected
    return candidate


def tfds_data_dir(tfds_dir: str | None = None) -> str:
    """Where TFDS builds go: ``tfds_dir``, else ``$TFDS_DATA_DIR``, else TFDS's default."""
    return (
        tfds_dir
        or os.environ.get(TFDS_DIR_ENV)
        or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def builder(name: str, tfds_dir: str | None = None):
    """The dataset's TFDS builder (array_record) in :func:`tfds_data_dir`."""
    return builder_class(name)(data_dir=tfds_data_dir(tfds_dir))


def prepare(name: str, data_dir: str | None = None, tfds_dir: str | None = None):
    """Build the dataset with TFDS unless it is built already; returns the prepared builder.

    A prepared build is reused as it is: its raw files need not be present any more.
    """
    b = builder(name, tfds_dir)
    if b.is_prepared():
        return b
    source = raw_dir(name, data_dir)
    config = tfds.download.DownloadConfig(manual_dir=source) if source else None
    b.download_and_prepare(download_config=config)
    return b


def load_records(
    name: str, data_dir: str | None = None, tfds_dir: str | None = None
) -> list[UserRecord]:
    """Every user's record, sorted by the dataset's user id (TFDS stores them shuffled)."""
    source = prepare(name, data_dir, tfds_dir).as_data_source(split="train")
    records = [
        UserRecord(
            user=r["user"].decode() if isinstance(r["user"], bytes) else str(r["user"]),
            items=r["items"],
            timestamps=r["timestamps"],
            ratings=r["ratings"],
        )
        for r in source
    ]
    return sorted(records, key=lambda r: _user_sort_key(r.user))


def _user_sort_key(user: str) -> tuple[int, int | str]:
    return (0, int(user)) if user.isdigit() else (1, user)


def build_splits(
    name: str,
    protocol: ProtocolConfig,
    samples: SampleConfig,
    seed: int,
    data_dir: str | None = None,
    tfds_dir: str | None = None,
) -> Splits:
    """Raw files -> TFDS -> records -> train/val/test samples, with statistics in ``info``."""
    records = load_records(name, data_dir, tfds_dir)
    splits, stats = build_dataset_samples(records, protocol, samples, seed, dataset=name)
    cls = builder_class(name)
    splits.info = {"dataset": name, "order": cls.ORDER, **stats}
    return splits
