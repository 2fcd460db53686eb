"""Raw interaction files of the real datasets -> one :class:`UserRecord` per user.

Every reader takes the file as it is published (inside its zip archive, or extracted next to
it) and fails with a :class:`~duet_jax.errors.DataError` that names the file, the line and
what was expected. Nothing is skipped silently: a blank line is the only thing ignored,
because it holds no data.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from duet_jax.errors import DataError

NO_TIMESTAMP = -1  # where a dataset records order but not time
NO_RATING = 0  # where a dataset records no rating


@dataclasses.dataclass(frozen=True)
class UserRecord:
    """One user's interactions, in the dataset's own ids, oldest first."""

    user: str  # the dataset's own user id
    items: np.ndarray  # [n] int64, the dataset's own item ids
    timestamps: np.ndarray  # [n] int64, unix seconds, or NO_TIMESTAMP
    ratings: np.ndarray  # [n] int8, 1..5, or NO_RATING


@dataclasses.dataclass(frozen=True)
class RawFile:
    """Where one raw file lives: a member of a zip archive, or the extracted file itself."""

    archive: str  # zip file name inside the dataset's raw directory
    member: str  # path of the file inside the archive
    parse: Callable[[Iterator[tuple[int, str]], str], list[UserRecord]]

    def candidates(self, raw_dir: str) -> list[str]:
        """Extracted paths accepted instead of the archive (as unzipped, or flat)."""
        names = [self.member, os.path.basename(self.member)]
        return [os.path.join(raw_dir, n) for n in dict.fromkeys(names)]

    def exists(self, raw_dir: str) -> bool:
        paths = [os.path.join(raw_dir, self.archive), *self.candidates(raw_dir)]
        return any(os.path.isfile(p) for p in paths)

    def read(self, raw_dir: str) -> list[UserRecord]:
        """Every user's record; raises :class:`DataError` if the file holds none."""
        records, source = self._read(raw_dir)
        if not records:
            raise DataError(f"{source}: the file holds no interactions")
        return records

    def _read(self, raw_dir: str) -> tuple[list[UserRecord], str]:
        if not os.path.isdir(raw_dir):
            raise DataError(f"raw data directory {raw_dir} does not exist")
        archive = os.path.join(raw_dir, self.archive)
        if os.path.isfile(archive):
            return _read_zip_member(archive, self.member, self.parse)
        for path in self.candidates(raw_dir):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    return self.parse(_lines(f, path), path), path
        expected = " or ".join(
            [self.archive, *(os.path.relpath(p, raw_dir) for p in self.candidates(raw_dir))]
        )
        raise DataError(f"{raw_dir}: missing raw file, expected {expected}")


def _read_zip_member(archive: str, member: str, parse) -> tuple[list[UserRecord], str]:
    source = f"{archive}:{member}"
    try:
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise DataError(
                    f"{archive}: the archive has no member {member!r} "
                    f"(members: {sorted(zf.namelist())[:8]})"
                )
            with zf.open(member) as f:
                return parse(_lines(f, source), source), source
    except zipfile.BadZipFile as err:  # also raised mid-read when a CRC does not match
        raise DataError(f"{archive}: not a readable zip archive ({err})") from None


def _lines(f, source: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each non-blank line, without its line ending."""
    for number, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise DataError(f"{source}, line {number}: not UTF-8 text ({err})") from None
        if line.strip():
            yield number, line


def _fields(line: str, number: int, source: str, sep: str | None, count: int, names: str):
    fields = line.split(sep)
    if len(fields) != count:
        raise DataError(
            f"{source}, line {number}: expected {count} fields ({names}) separated by "
            f"{'a tab' if sep == chr(9) else repr(sep)}, found {len(fields)}: {line[:80]!r}"
        )
    return fields


def parse_int(text: str, number: int, source: str, field: str, low: int) -> int:
    """``int(text)``, or a DataError naming the file, line and field, also when below ``low``."""
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{source}, line {number}: {field} {text!r} is not an integer") from None
    if value < low:
        raise DataError(f"{source}, line {number}: {field} {value} is below {low}")
    return value


def _group(users: list[int], items, timestamps, ratings, order_by_time: bool) -> list[UserRecord]:
    """Rows -> one record per user, users ascending; within a user, by timestamp if
    ``order_by_time`` (ties keep file order), else file order."""
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    timestamps = np.asarray(timestamps, np.int64)
    ratings = np.asarray(ratings, np.int8)
    row = np.arange(len(users))
    order = np.lexsort((row, timestamps, users) if order_by_time else (row, users))
    users, items = users[order], items[order]
    timestamps, ratings = timestamps[order], ratings[order]
    cuts = np.flatnonzero(np.diff(users)) + 1
    return [
        UserRecord(str(users[s[0]]), items[s], timestamps[s], ratings[s])
        for s in np.split(np.arange(len(users)), cuts)
        if len(s)
    ]


def _rating(text: str, number: int, source: str) -> int:
    rating = parse_int(text, number, source, "rating", 1)
    if rating > 5:
        raise DataError(f"{source}, line {number}: rating {rating} is not in 1..5")
    return rating


def _parse_rating_rows(lines, source: str, with_time: bool) -> list[UserRecord]:
    """Tab-separated ``user, item, rating[, timestamp]`` rows, any row order."""
    names = "user, item, rating" + (", timestamp" if with_time else "")
    users, items, ratings, stamps = [], [], [], []
    for number, line in lines:
        fields = _fields(line, number, source, "\t", 4 if with_time else 3, names)
        users.append(parse_int(fields[0], number, source, "user id", 1))
        items.append(parse_int(fields[1], number, source, "item id", 1))
        ratings.append(_rating(fields[2], number, source))
        stamps.append(
            parse_int(fields[3], number, source, "timestamp (unix seconds)", 0)
            if with_time
            else NO_TIMESTAMP
        )
    return _group(users, items, stamps, ratings, order_by_time=with_time)


def parse_movielens(lines: Iterator[tuple[int, str]], source: str) -> list[UserRecord]:
    """MovieLens ``u.data``: ``user \\t item \\t rating \\t unix_timestamp``, any row order;
    each user's items are ordered by timestamp (ties keep file order)."""
    return _parse_rating_rows(lines, source, with_time=True)


def parse_ratings_without_time(lines: Iterator[tuple[int, str]], source: str) -> list[UserRecord]:
    """Douban ``ratings.dat``: ``user \\t item \\t rating``. No timestamps: a user's rows are
    kept in file order, the only order there is."""
    return _parse_rating_rows(lines, source, with_time=False)


def parse_sequences(lines: Iterator[tuple[int, str]], source: str) -> list[UserRecord]:
    """One user per line: ``user item_1 item_2 ... item_n`` (spaces, oldest first), as the
    S3-Rec and HGN preprocessings publish them. Ids may start at 0."""
    records: dict[int, UserRecord] = {}
    for number, line in lines:
        fields = line.split()
        if len(fields) < 2:
            raise DataError(
                f"{source}, line {number}: expected a user id followed by at least one item "
                f"id, found {line[:80]!r}"
            )
        user = parse_int(fields[0], number, source, "user id", 0)
        if user in records:
            raise DataError(f"{source}, line {number}: user {user} already had a line")
        items = [
            parse_int(x, number, source, f"item id #{k}", 0)
            for k, x in enumerate(fields[1:], start=1)
        ]
        n = len(items)
        records[user] = UserRecord(
            str(user),
            np.asarray(items, np.int64),
            np.full(n, NO_TIMESTAMP, np.int64),
            np.full(n, NO_RATING, np.int8),
        )
    return [records[u] for u in sorted(records)]
