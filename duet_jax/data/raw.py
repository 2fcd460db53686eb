"""Raw interaction files of the real datasets -> one :class:`UserRecord` per user.

Every reader takes the file as it is published (inside its zip archive, or extracted next to
it) and fails with a :class:`~duet_jax.errors.DataError` that names the file, the line and
what was expected. Nothing is skipped silently: a blank line is the only thing ignored,
because it holds no data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from duet_jax.errors import DataError

NO_TIMESTAMP = -1  # where a dataset records order but not time
NO_RATING = 0  # where a dataset records no rating
INT64_MAX = 2**63 - 1  # ids and timestamps are stored as int64

# The published content of each raw file the builders read, by member name: bytes, sha256 and
# non-blank lines (MovieLens-100K's u.data is GroupLens's; the others are the files as their
# preprocessing repositories publish them). A file with one of these names is verified
# against its entry (:func:`verify`), so a truncated or edited copy is refused by name.
KNOWN_FILES: dict[str, tuple[int, str, int]] = {
    "ml-100k/u.data": (
        1_979_173, "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490", 100_000),
    "Beauty.txt": (
        1_090_094, "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8", 22_363),
    "Sports_and_Outdoors.txt": (
        1_707_483, "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2", 35_598),
    "Toys_and_Games.txt": (
        922_166, "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f", 19_412),
    "CDs_item_sequences.txt": (
        2_776_874, "089c081286563726603b1e25c092ba1ed3d8746c81f22585e6db3bf877bb7e26", 17_052),
    # the published file has no line ending after its last row
    "douban_book/ratings.dat": (
        1_116_081, "cc1c191fabe2e05e95cd6dbe7be19d13ed3e1b27b80be2050e4f6b4e40945ddd", 96_041),
}
# set to 1 to build from a raw file that differs from its published content (a subsample,
# a cleaned copy): it is then reported as unverified instead of refused
ALLOW_MODIFIED_ENV = "DUET_ALLOW_MODIFIED_RAW"


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
        """Every user's record; raises :class:`DataError` if the file holds none, or if its
        last line has no line ending (a truncated file) unless the file is the published one."""
        records, source = self._read(raw_dir)
        if not records:
            raise DataError(f"{source}: the file holds no interactions")
        return records

    def _open(self, raw_dir: str):
        """``(binary file object, source name)`` of the raw file in ``raw_dir``."""
        if not os.path.isdir(raw_dir):
            raise DataError(f"raw data directory {raw_dir} does not exist")
        archive = os.path.join(raw_dir, self.archive)
        if os.path.isfile(archive):
            return _open_zip_member(archive, self.member)
        for path in self.candidates(raw_dir):
            if os.path.isfile(path):
                return open(path, "rb"), path
        expected = " or ".join(
            [self.archive, *(os.path.relpath(p, raw_dir) for p in self.candidates(raw_dir))]
        )
        raise DataError(f"{raw_dir}: missing raw file, expected {expected}")

    def _read(self, raw_dir: str) -> tuple[list[UserRecord], str]:
        f, source = self._open(raw_dir)
        with _zip_errors(source), f:
            return self.parse(_lines(f, source, KNOWN_FILES.get(self.member)), source), source

    def fingerprint(self, raw_dir: str) -> dict:
        """What the raw file holds, read in full: ``{"member", "bytes", "sha256", "rows"}``
        (rows: non-blank lines) and ``"verified"``, whether it is the published content
        (:data:`KNOWN_FILES`; None when no published content is known). The same content in
        a zip or extracted gives the same fingerprint."""
        f, source = self._open(raw_dir)
        digest, size, rows = hashlib.sha256(), 0, 0
        with _zip_errors(source), f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
                rows += chunk.count(b"\n")
                last = chunk
        # rows: lines, counting a last line without a line ending, less blank lines is not
        # worth a second pass; every shipped file has no blank line
        if size and not last.endswith(b"\n"):
            rows += 1
        known = KNOWN_FILES.get(self.member)
        sha = digest.hexdigest()
        return {
            "member": self.member,
            "source": source,
            "bytes": size,
            "sha256": sha,
            "rows": rows,
            "verified": None if known is None else (size, sha) == known[:2],
        }


def verify(fingerprint: dict) -> dict:
    """``fingerprint`` (:meth:`RawFile.fingerprint`) if its file is the published content or
    no published content is known; a :class:`DataError` naming the file and both contents
    otherwise, unless ``$DUET_ALLOW_MODIFIED_RAW=1`` (then it is returned as unverified)."""
    known = KNOWN_FILES.get(fingerprint["member"])
    if known is None or fingerprint["verified"] or os.environ.get(ALLOW_MODIFIED_ENV) == "1":
        return fingerprint
    size, sha, rows = known
    got = fingerprint
    raise DataError(
        f"{got['source']}: this is not the published {got['member']} ({size:,} bytes, "
        f"{rows:,} rows, sha256 {sha[:16]}...) but {got['bytes']:,} bytes, {got['rows']:,} "
        f"rows, sha256 {got['sha256'][:16]}...: the file is truncated or modified. Restore "
        f"the original file, or set {ALLOW_MODIFIED_ENV}=1 to build from this copy on purpose"
    )


@contextlib.contextmanager
def _zip_errors(source: str):
    """A damaged zip member (CRC mismatch mid-read) as a DataError naming the archive."""
    try:
        yield
    except zipfile.BadZipFile as err:
        archive = source.split(":", 1)[0]
        raise DataError(f"{archive}: not a readable zip archive ({err})") from None


def _open_zip_member(archive: str, member: str):
    source = f"{archive}:{member}"
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive}: not a readable zip archive ({err})") from None
    if member not in zf.namelist():
        names = sorted(zf.namelist())[:8]
        zf.close()
        raise DataError(f"{archive}: the archive has no member {member!r} (members: {names})")
    # the member keeps the archive open; closing the archive object now is safe (zipfile
    # reference-counts the underlying file)
    f = zf.open(member)
    zf.close()
    return f, source


def _lines(f, source: str, known: tuple[int, str, int] | None = None
           ) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each non-blank line, without its line ending.

    A last line without a line ending is how a file cut mid-write or mid-copy ends, and its
    last field would parse as a shorter number: a :class:`DataError` naming the file and the
    line, unless the whole file is the published content ``known`` (some ship that way)."""
    digest, size, raw = hashlib.sha256(), 0, b""
    for number, raw in enumerate(f, start=1):
        digest.update(raw)
        size += len(raw)
        if not raw.endswith(b"\n"):
            rest = f.read()  # empty: an unterminated line is the file's last
            digest.update(rest)
            size += len(rest)
            if known is None or (size, digest.hexdigest()) != known[:2]:
                raise DataError(
                    f"{source}, line {number}: the last line has no line ending "
                    f"({raw[:80].decode('utf-8', 'replace')!r}): the file looks truncated. "
                    "Restore the complete file "
                    "(if this line is complete, end it with a newline)"
                )
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


def parse_int(text: str, number: int, source: str, field: str, low: int,
              high: int = INT64_MAX) -> int:
    """``int(text)``, or a DataError naming the file, line and field, also when below ``low``
    or above ``high`` (default: the largest int64, what ids and timestamps are stored as)."""
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{source}, line {number}: {field} {text!r} is not an integer") from None
    if value < low:
        raise DataError(f"{source}, line {number}: {field} {value} is below {low}")
    if value > high:
        raise DataError(
            f"{source}, line {number}: {field} {value} is above {high:,} (the largest "
            f"{'64-bit integer' if high == INT64_MAX else 'value allowed'})"
        )
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
