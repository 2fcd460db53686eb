"""The real datasets by name: find their raw files, build them with TFDS, read them back.

    records = load_records("movielens_100k", data_dir=os.environ["DUET_DATA_DIR"])

``data_dir`` may be the root that holds every dataset's directory (``DUET_DATA_DIR``, e.g.
``.../data`` with ``movielens-100k/`` inside) or the dataset's own directory. The TFDS
build goes to ``tfds_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (read at
call time: TFDS itself reads the variable once, when it is imported).

A build records the fingerprint of the raw file it was made from (member name, bytes,
sha256, rows; ``duet_raw_fingerprint.json`` beside TFDS's ``dataset_info.json``). A later
call reuses the build when the raw file it finds has the same fingerprint, rebuilds it when
the file differs (a shared TFDS directory never serves another copy's data), and, when the
raw files are gone, reuses it as recorded. A build made before fingerprints existed is
adopted (its fingerprint recorded) when its records equal what the raw file parses to, and
rebuilt otherwise. Raw files with a published content
(:data:`duet_jax.data.raw.KNOWN_FILES`) are verified before they are built from. TFDS writes a
build under a temporary name and renames it when complete, so a failed build leaves
nothing a later call would pick up. Processes sharing a TFDS directory take turns on a
dataset (a lock file in its directory): one builds it, the others then find it built.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from duet_jax import files
from duet_jax.data import raw
from duet_jax.data.protocol import ProtocolConfig, build_dataset_samples
from duet_jax.data.raw import UserRecord
from duet_jax.data.samples import SampleConfig, Splits
from duet_jax.data.tfds_builders import BUILDERS, InteractionSequences
from duet_jax.errors import DataError

DATA_DIR_ENV = "DUET_DATA_DIR"
TFDS_DIR_ENV = "TFDS_DATA_DIR"
FINGERPRINT_FILE = "duet_raw_fingerprint.json"  # in the build's version directory
# the fields of a raw fingerprint that say what the content is (not where it was read)
CONTENT_FIELDS = ("member", "bytes", "sha256")


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
    if not cls.RAW.exists(candidate):
        # a directory was named: never fall back to a download the user did not ask for
        cls.RAW.read(candidate)  # raises DataError naming the files it expected
    return candidate


def _find_raw_dir(name: str, data_dir: str | None) -> str | None:
    """:func:`raw_dir` when the raw file is there, else None (no error)."""
    try:
        return raw_dir(name, data_dir)
    except DataError:
        return None


def raw_fingerprint(name: str, data_dir: str | None = None) -> dict | None:
    """The verified fingerprint (:meth:`duet_jax.data.raw.RawFile.fingerprint`) of the
    dataset's raw file in ``data_dir`` (or ``$DUET_DATA_DIR``), or None when there is none
    to read. Raises :class:`DataError` for a file that is not its published content."""
    source = _find_raw_dir(name, data_dir)
    if source is None:
        return None
    fingerprint = raw.verify(builder_class(name).RAW.fingerprint(source))
    if fingerprint["verified"] is False:
        logging.warning("%s: built from a modified copy (%s=1): %s", name,
                        raw.ALLOW_MODIFIED_ENV, fingerprint)
    return fingerprint


def content(fingerprint: dict | None) -> dict | None:
    """The part of a raw fingerprint that identifies the content (a cache key)."""
    return None if fingerprint is None else {k: fingerprint.get(k) for k in CONTENT_FIELDS}


def stored_fingerprint(b) -> dict | None:
    """The raw fingerprint a prepared build recorded (None: built before fingerprints)."""
    path = os.path.join(b.data_dir, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _download_fingerprint(cls) -> dict:
    """A downloaded archive's fingerprint: TFDS verified it against checksums.tsv."""
    info = cls.url_infos[cls.DOWNLOAD_URL]
    return {"member": cls.RAW.member, "source": cls.DOWNLOAD_URL, "bytes": None,
            "sha256": None, "archive_sha256": info.checksum, "archive_bytes": info.size,
            "rows": None, "verified": True}


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
    """Build the dataset with TFDS unless a build of the same raw file exists; returns the
    prepared builder (module docstring: reused, rebuilt, or reused as recorded when the
    raw files are gone). Concurrent calls for one dataset and TFDS directory wait for each
    other (:func:`duet_jax.files.workdir_lock` on the dataset's directory), as two TFDS
    builds of the same dataset would collide when each renames its temporary directory."""
    with _builders_take_turns(name, tfds_dir):
        return _prepare(name, data_dir, tfds_dir)


# errno values of a directory this process may not write to
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def _builders_take_turns(name: str, tfds_dir: str | None) -> Iterator[None]:
    """Hold the dataset's build lock (``TFDS_DIR/duet_<name>/.lock``, waiting for another
    holder) for the block. A TFDS directory this process cannot write to gets no lock: it
    cannot build there either, so there is no build to collide with, only one to read."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(files.workdir_lock(
                os.path.join(tfds_data_dir(tfds_dir), builder_class(name).name), wait=True))
        except OSError as err:
            if err.errno not in _READ_ONLY:
                raise
        yield


def _prepare(name: str, data_dir: str | None, tfds_dir: str | None):
    """:func:`prepare`'s work, under the dataset's build lock."""
    b = builder(name, tfds_dir)
    fingerprint = raw_fingerprint(name, data_dir)
    if b.is_prepared():
        stored = stored_fingerprint(b)
        if fingerprint is None or content(stored) == content(fingerprint):
            return b
        if stored is None and _same_records(b, name, data_dir):
            # built before fingerprints, from this very content: adopt it (no rebuild, so a
            # process reading the build meanwhile is not disturbed)
            _record(b, fingerprint)
            return b
        logging.warning(
            "%s: the TFDS build in %s was made from %s, the raw file is now %s: rebuilding",
            name, b.data_dir, content(stored) or "an unrecorded file (built before "
            "fingerprints)", content(fingerprint))
        shutil.rmtree(b.data_dir)
        b = builder(name, tfds_dir)
    source = raw_dir(name, data_dir)
    config = tfds.download.DownloadConfig(manual_dir=source) if source else None
    b.download_and_prepare(download_config=config)
    if fingerprint is None:
        fingerprint = _download_fingerprint(builder_class(name))
    _record(b, fingerprint)
    return b


def _record(b, fingerprint: dict) -> None:
    """Store ``fingerprint`` with the build ``b`` (where it was read from is left out)."""
    record = {k: v for k, v in fingerprint.items() if k != "source"}
    files.write_text_atomic(os.path.join(b.data_dir, FINGERPRINT_FILE),
                            files.dumps(record, sort_keys=True))


def _same_records(b, name: str, data_dir: str | None) -> bool:
    """Whether the build ``b`` holds exactly the records its raw file parses to."""
    built = _read_build(b)
    parsed = builder_class(name).RAW.read(raw_dir(name, data_dir))
    if len(built) != len(parsed):
        return False
    for x, y in zip(built, sorted(parsed, key=lambda r: _user_sort_key(r.user)), strict=True):
        if x.user != y.user or any(not np.array_equal(getattr(x, f), getattr(y, f))
                                   for f in ("items", "timestamps", "ratings")):
            return False
    return True


def build_fingerprint(name: str, data_dir: str | None = None,
                      tfds_dir: str | None = None) -> dict:
    """The raw fingerprint the dataset's samples come from: the raw file's when it is
    there, else the one its TFDS build recorded (building it if needed)."""
    fingerprint = raw_fingerprint(name, data_dir)
    if fingerprint is not None:
        return fingerprint
    b = prepare(name, data_dir, tfds_dir)
    return stored_fingerprint(b) or {"member": builder_class(name).RAW.member,
                                     "unrecorded": True}


def load_records(
    name: str, data_dir: str | None = None, tfds_dir: str | None = None
) -> list[UserRecord]:
    """Every user's record, sorted by the dataset's user id (TFDS stores them shuffled)."""
    return _read_build(prepare(name, data_dir, tfds_dir))


def _read_build(b) -> list[UserRecord]:
    source = b.as_data_source(split="train")
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
    fingerprint = build_fingerprint(name, data_dir, tfds_dir)
    read = {f"raw_{k}": fingerprint.get(k) for k in ("member", "bytes", "sha256", "rows",
                                                       "verified")}
    logging.info("%s: read %s (%s rows, %s users, %s items; verified against the published "
                 "content: %s)", name, read["raw_member"], stats["raw_interactions"],
                 stats["raw_users"], stats["raw_items"], read["raw_verified"])
    splits.info = {"dataset": name, "order": cls.ORDER, **read, **stats}
    return splits
