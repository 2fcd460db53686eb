"""TFDS builders for the real datasets: raw files -> array_record, one record per user.

Importing this module registers the builders with TFDS, so they work the way any TFDS
dataset does, without TensorFlow::

    builder = tfds.builder("duet_movielens_100k", data_dir=tfds_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=".../movielens-100k"))
    train = tfds.data_source("duet_movielens_100k", data_dir=tfds_dir, split="train")

Their file format defaults to array_record (TFDS's own default, tfrecord, needs TensorFlow
to write and cannot be read as a random-access data source). A record holds one user's
interactions in the dataset's own ids, oldest first::

    {"user": str, "items": int64[n], "timestamps": int64[n], "ratings": int8[n]}

``timestamps`` are -1 and ``ratings`` 0 where a dataset has none. TFDS shuffles records when
it writes them, so the user id is a feature and :func:`read_records` sorts by it.

Raw files come from ``download_config.manual_dir`` (the dataset's directory, e.g.
``$DUET_DATA_DIR/movielens-100k``), as the zip archive or extracted. MovieLens-100K is also
downloaded from GroupLens when no manual copy is given (checksum in ``checksums.tsv``).
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from duet_jax.data import raw

_FEATURES = {
    "user": tfds.features.Text(),
    "items": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    "ratings": tfds.features.Tensor(shape=(None,), dtype=np.int8),
}

_AMAZON_TERMS = (
    "Amazon review data (McAuley, UCSD): research, academic, non-commercial use; cite "
    "McAuley et al. SIGIR'15 and He & McAuley WWW'16."
)
_AMAZON_CITATION = """@inproceedings{he2016ups, title={Ups and downs: Modeling the visual
evolution of fashion trends with one-class collaborative filtering}, author={He, Ruining and
McAuley, Julian}, booktitle={WWW}, year={2016}}"""


class InteractionSequences(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: one raw file -> one ``train`` split of per-user records."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    RAW: raw.RawFile
    SUBDIR: str  # the dataset's directory under DUET_DATA_DIR
    ORDER: str  # what orders a user's items: "timestamp", "sequence" or "row order"
    HOMEPAGE = ""
    CITATION = ""
    TERMS = ""
    DOWNLOAD_URL: str | None = None
    DESCRIPTION = ""

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs) -> None:
        super().__init__(file_format=file_format, **kwargs)
        # A build already on disk keeps the format it was written in (TFDS restored it from
        # its dataset_info.json); a new build is array_record unless the caller asks otherwise.
        if file_format is None and not self.is_prepared():
            self.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)

    @classmethod
    def manual_instructions(cls) -> str:
        return (
            f"Put {cls.RAW.archive} (or its member {cls.RAW.member}, extracted) in the "
            f"dataset's directory, {cls.SUBDIR}/ under DUET_DATA_DIR or --data_dir. "
            f"Source: {cls.HOMEPAGE}. Terms: {cls.TERMS}"
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DESCRIPTION}\n\nItems are ordered by {self.ORDER}.\n"
            f"Terms of use: {self.TERMS}",
            features=tfds.features.FeaturesDict(dict(_FEATURES)),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    def _raw_dir(self, dl_manager) -> str:
        try:
            manual = os.fspath(dl_manager.manual_dir)
        except AssertionError:  # TFDS: no manual_dir given, or it is missing or empty
            manual = None
        if manual and self.RAW.exists(manual):
            return manual
        if self.DOWNLOAD_URL:
            return os.fspath(dl_manager.download_and_extract(self.DOWNLOAD_URL))
        # Let RawFile.read name the directory and the files it expected.
        return manual or "(no manual_dir given)"

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self._raw_dir(dl_manager))}

    def _generate_examples(self, raw_dir: str):
        for record in self.RAW.read(raw_dir):
            yield (
                record.user,
                {
                    "user": record.user,
                    "items": record.items,
                    "timestamps": record.timestamps,
                    "ratings": record.ratings,
                },
            )


class DuetMovielens100k(InteractionSequences):
    """MovieLens-100K ratings (``u.data``), each user's items ordered by timestamp."""

    name = "duet_movielens_100k"
    SUBDIR = "movielens-100k"
    ORDER = "timestamp"
    RAW = raw.RawFile("ml-100k.zip", "ml-100k/u.data", raw.parse_movielens)
    DOWNLOAD_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    HOMEPAGE = "https://grouplens.org/datasets/movielens/100k/"
    DESCRIPTION = "MovieLens 100K: 100,000 ratings (1-5) by 943 users of 1,682 movies."
    TERMS = (
        "GroupLens research-use terms: research use only, no redistribution without "
        "permission, no commercial use, cite Harper & Konstan 2015."
    )
    CITATION = """@article{harper2015movielens, title={The MovieLens Datasets: History and
Context}, author={Harper, F. Maxwell and Konstan, Joseph A.}, journal={ACM TiiS}, volume={5},
number={4}, year={2015}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: ml-100k.zip, else it is downloaded."


class DuetAmazonCds(InteractionSequences):
    """Amazon CDs & Vinyl in the HGN preprocessing (ordered sequences, text version)."""

    name = "duet_amazon_cds"
    SUBDIR = "amazon-cds-hgn"
    ORDER = "sequence"
    RAW = raw.RawFile("amazon_cds_hgn_text.zip", "CDs_item_sequences.txt", raw.parse_sequences)
    HOMEPAGE = "https://github.com/allenjack/HGN"
    DESCRIPTION = (
        "Amazon CDs & Vinyl (2014), HGN preprocessing (Ma et al. KDD'19): ratings >= 4, "
        "users >= 10 items, chronological, 0-based ids. Text dump of the HGN pickles."
    )
    TERMS = _AMAZON_TERMS + " Cite HGN (KDD'19) for the preprocessing."
    CITATION = _AMAZON_CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "amazon_cds_hgn_text.zip or CDs_item_sequences.txt"


class _S3RecAmazon(InteractionSequences, skip_registration=True):
    SUBDIR = "amazon-s3rec-5core"
    ORDER = "sequence"
    HOMEPAGE = "https://github.com/RUCAIBox/CIKM2020-S3Rec"
    TERMS = _AMAZON_TERMS + " Cite S3-Rec (CIKM'20) for the 5-core preprocessing."
    CITATION = _AMAZON_CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "amazon_s3rec_5core.zip or the category's .txt file"


class DuetAmazonBeauty(_S3RecAmazon):
    """Amazon Beauty, S3-Rec 5-core (ordered sequences)."""

    name = "duet_amazon_beauty"
    RAW = raw.RawFile("amazon_s3rec_5core.zip", "Beauty.txt", raw.parse_sequences)
    DESCRIPTION = "Amazon Beauty (2014), 5-core, S3-Rec preprocessing, chronological."


class DuetAmazonSports(_S3RecAmazon):
    """Amazon Sports & Outdoors, S3-Rec 5-core (ordered sequences)."""

    name = "duet_amazon_sports"
    RAW = raw.RawFile("amazon_s3rec_5core.zip", "Sports_and_Outdoors.txt", raw.parse_sequences)
    DESCRIPTION = "Amazon Sports & Outdoors (2014), 5-core, S3-Rec preprocessing, chronological."


class DuetAmazonToys(_S3RecAmazon):
    """Amazon Toys & Games, S3-Rec 5-core (ordered sequences)."""

    name = "duet_amazon_toys"
    RAW = raw.RawFile("amazon_s3rec_5core.zip", "Toys_and_Games.txt", raw.parse_sequences)
    DESCRIPTION = "Amazon Toys & Games (2014), 5-core, S3-Rec preprocessing, chronological."


class DuetDoubanBook(InteractionSequences):
    """Douban Book ratings (DTCDR). No timestamps: row order is the only order there is."""

    name = "duet_douban_book"
    SUBDIR = "douban-book"
    ORDER = "row order (the file has no timestamps, so the true order is unknown)"
    RAW = raw.RawFile(
        "douban_book_dtcdr.zip", "douban_book/ratings.dat", raw.parse_ratings_without_time
    )
    HOMEPAGE = "https://github.com/fengzhu1/GA-DTCDR"
    DESCRIPTION = (
        "Douban Book ratings (1-5) as released with DTCDR (CIKM'19) / GA-DTCDR (IJCAI'20). "
        "No timestamps: sequential models see row order, which is not known to be time."
    )
    TERMS = "Released for research use; cite DTCDR (CIKM'19) and/or GA-DTCDR (IJCAI'20)."
    CITATION = """@inproceedings{zhu2019dtcdr, title={DTCDR: A framework for dual-target
cross-domain recommendation}, author={Zhu, Feng and others}, booktitle={CIKM}, year={2019}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "douban_book_dtcdr.zip or douban_book/ratings.dat"


BUILDERS: dict[str, type[InteractionSequences]] = {
    "movielens_100k": DuetMovielens100k,
    "amazon_cds": DuetAmazonCds,
    "amazon_beauty": DuetAmazonBeauty,
    "amazon_sports": DuetAmazonSports,
    "amazon_toys": DuetAmazonToys,
    "douban_book": DuetDoubanBook,
}
