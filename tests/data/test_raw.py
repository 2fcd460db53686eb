"""Raw-file readers on crafted files: parsing, ordering, and every bad-input error."""

import os
import zipfile

import numpy as np
import pytest

from duet_jax.data import raw
from duet_jax.errors import DataError

MOVIELENS = raw.RawFile("ml-100k.zip", "ml-100k/u.data", raw.parse_movielens)
SEQUENCES = raw.RawFile("seq.zip", "Beauty.txt", raw.parse_sequences)
DOUBAN = raw.RawFile("douban.zip", "douban_book/ratings.dat", raw.parse_ratings_without_time)


def write(path, text: str | bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def test_movielens_orders_each_user_by_timestamp_keeping_file_order_on_ties(tmp_path):
    write(
        tmp_path / "ml-100k" / "u.data",
        "2\t7\t5\t300\n1\t5\t3\t200\n1\t4\t4\t100\n1\t9\t1\t200\n\n",
    )
    records = MOVIELENS.read(str(tmp_path))
    assert [r.user for r in records] == ["1", "2"]
    np.testing.assert_array_equal(records[0].items, [4, 5, 9])  # 100, then the 200s in file order
    np.testing.assert_array_equal(records[0].timestamps, [100, 200, 200])
    np.testing.assert_array_equal(records[0].ratings, [4, 3, 1])
    np.testing.assert_array_equal(records[1].items, [7])


def test_zip_and_extracted_file_read_the_same(tmp_path):
    text = "1\t5\t3\t200\n1\t4\t4\t100\n"
    write(tmp_path / "plain" / "u.data", text)  # flat, as a user might extract it
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.data", text)
    a = MOVIELENS.read(str(tmp_path / "plain"))
    b = MOVIELENS.read(str(tmp_path))
    np.testing.assert_array_equal(a[0].items, b[0].items)


def test_sequences_keep_line_order_and_douban_keeps_row_order(tmp_path):
    write(tmp_path / "Beauty.txt", "2 9 8\n1 3 1 2\n")
    records = SEQUENCES.read(str(tmp_path))
    assert [r.user for r in records] == ["1", "2"]
    np.testing.assert_array_equal(records[0].items, [3, 1, 2])
    assert (records[0].timestamps == raw.NO_TIMESTAMP).all()
    write(tmp_path / "douban_book" / "ratings.dat", "1\t30\t4\n2\t5\t1\n1\t10\t5\n")
    records = DOUBAN.read(str(tmp_path))
    np.testing.assert_array_equal(records[0].items, [30, 10])
    np.testing.assert_array_equal(records[0].ratings, [4, 5])


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t3\n", r"u.data, line 2: expected 4 fields \(user, item, rating, timestamp\)"),
        ("1\tx\t3\t100\n", r"u.data, line 2: item id 'x' is not an integer"),
        ("1\t2\t3\t12:00\n", r"u.data, line 2: timestamp \(unix seconds\) '12:00' is not an"),
        ("1\t2\t3\t-5\n", r"u.data, line 2: timestamp \(unix seconds\) -5 is below 0"),
        ("1\t2\t9\t100\n", r"u.data, line 2: rating 9 is not in 1..5"),
        ("0\t2\t3\t100\n", r"u.data, line 2: user id 0 is below 1"),
    ],
)
def test_malformed_movielens_line_names_file_line_and_expectation(tmp_path, line, message):
    write(tmp_path / "u.data", "1\t1\t3\t100\n" + line)
    with pytest.raises(DataError, match=message):
        MOVIELENS.read(str(tmp_path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3\n7\n", r"Beauty.txt, line 2: expected a user id followed by at least one item"),
        ("1 2 3\n2 4 b\n", r"Beauty.txt, line 2: item id #2 'b' is not an integer"),
        ("1 2 3\n1 4\n", r"Beauty.txt, line 2: user 1 already had a line"),
        (b"1 2 3\n2 \xff\n", r"Beauty.txt, line 2: not UTF-8 text"),
    ],
)
def test_malformed_sequence_line(tmp_path, text, message):
    write(tmp_path / "Beauty.txt", text)
    with pytest.raises(DataError, match=message):
        SEQUENCES.read(str(tmp_path))


def test_missing_directory_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"raw data directory .*nowhere does not exist"):
        MOVIELENS.read(str(tmp_path / "nowhere"))
    with pytest.raises(
        DataError,
        match=r"missing raw file, expected ml-100k.zip or "
        r"ml-100k/u.data or u.data",
    ):
        MOVIELENS.read(str(tmp_path))


def test_corrupt_zip_and_missing_member(tmp_path):
    write(tmp_path / "ml-100k.zip", b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match=r"ml-100k.zip: not a readable zip archive"):
        MOVIELENS.read(str(tmp_path))
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.item", "1|Toy Story")
    with pytest.raises(DataError, match=r"has no member 'ml-100k/u.data'"):
        MOVIELENS.read(str(tmp_path))


def test_zip_with_damaged_member_data_is_a_clear_error(tmp_path):
    path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("ml-100k/u.data", "1\t2\t3\t100\n" * 50)
    data = bytearray(path.read_bytes())
    start = data.index(b"1\t2\t3\t100")
    data[start + 20 : start + 24] = b"9999"  # the stored CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"ml-100k.zip: not a readable zip archive"):
        MOVIELENS.read(str(tmp_path))


def test_empty_file_is_an_error(tmp_path):
    write(tmp_path / "u.data", "\n\n")
    with pytest.raises(DataError, match=r"u.data: the file holds no interactions"):
        MOVIELENS.read(str(tmp_path))
