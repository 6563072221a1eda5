"""Readers for the rating-log formats we train on, fast on big files and precise about bad rows.

Every format writes one event per line as (user, item, rating, timestamp):

    movielens-csv   ratings.csv of ml-latest(-small), ml-20m, ml-25m: header userId,movieId,rating,timestamp
    movielens-dat   ratings.dat of ml-1m, ml-10m: UserID::MovieID::Rating::Timestamp, no header
    amazon-csv      Amazon "ratings only" CSV (e.g. ratings_Books.csv): user,item,rating,timestamp, no header
    recbole-inter   RecBole atomic .inter file: tab-separated, typed header user_id:token ...

The good path is one pyarrow CSV read (multithreaded, strict about numbers). Only when it fails,
or a value it let through is not allowed (NaN rating, empty id, negative time), do we look at lines
one by one to name the bad line: from the row pyarrow flagged, or from the start of the block it
choked on, so even a broken ml-20m is reported in seconds. A file that looks cut off inside its last
row is refused too (see ``_check_not_cut_off``).

Example::

    >>> frame = read_ratings(Path("ml-latest-small/ratings.csv"), Format.MOVIELENS_CSV)  # doctest: +SKIP
    >>> frame.columns.tolist()                                                         # doctest: +SKIP
    ['user', 'item', 'timestamp', 'rating']
"""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data.interactions import COLUMNS, DatasetSource, Interactions, sha256_files, stat_fingerprint

MAX_TIMESTAMP = 2**53
"""Timestamps are whole seconds in [0, MAX_TIMESTAMP): the range serving accepts
(``serving.validation.MAX_TIMESTAMP``), so nothing is trained on a time a request could not carry."""


class Format(StrEnum):
    MOVIELENS_CSV = "movielens-csv"
    MOVIELENS_DAT = "movielens-dat"
    AMAZON_CSV = "amazon-csv"
    RECBOLE_INTER = "recbole-inter"


class MalformedFileError(ValueError):
    """A rating file that does not follow its format; the message names the file and the line."""


@dataclass(frozen=True)
class Layout:
    """How one format writes a row. Field order is (user, item, rating, timestamp) in all of them."""

    fields: tuple[str, str, str, str]
    """The format's own names for the four fields, used in error messages."""
    separator: str
    header: str | None
    """The exact first line, or None when the file starts with data."""
    string_ids: bool
    """Ids are kept as strings (Amazon ASINs have leading zeros); otherwise they must be integers."""
    quoted: bool
    """CSV quoting applies (a field may be wrapped in double quotes)."""

    @property
    def expected(self) -> str:
        shown = "<tab>" if self.separator == "\t" else self.separator
        return f"{shown.join(self.fields)} ({len(self.fields)} fields)"


LAYOUTS: dict[Format, Layout] = {
    Format.MOVIELENS_CSV: Layout(
        fields=("userId", "movieId", "rating", "timestamp"),
        separator=",",
        header="userId,movieId,rating,timestamp",
        string_ids=False,
        quoted=True,
    ),
    Format.MOVIELENS_DAT: Layout(
        fields=("UserID", "MovieID", "Rating", "Timestamp"),
        separator="::",
        header=None,
        string_ids=False,
        quoted=False,
    ),
    Format.AMAZON_CSV: Layout(
        fields=("user", "item", "rating", "timestamp"),
        separator=",",
        header=None,
        string_ids=True,
        quoted=True,
    ),
    Format.RECBOLE_INTER: Layout(
        fields=("user_id", "item_id", "rating", "timestamp"),
        separator="\t",
        header="user_id:token\titem_id:token\trating:float\ttimestamp:float",
        string_ids=True,
        quoted=False,
    ),
}

RAW_ITEM_KINDS = {
    Format.MOVIELENS_CSV: "movieId",
    Format.MOVIELENS_DAT: "movieId",
    Format.AMAZON_CSV: "asin",
    Format.RECBOLE_INTER: "item_id token",
}


@dataclass(frozen=True)
class TextFile:
    """A file to read: a plain path, or a member of a zip archive (how the downloads ship)."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}!{self.member}"

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.member is None:
            with open(self.path, "rb") as f:
                yield f
        else:
            # Members are read whole (tens of MB at most): pyarrow then gets a seekable buffer.
            with zipfile.ZipFile(self.path) as archive:
                yield io.BytesIO(archive.read(self.member))

    def arrow_input(self) -> pa.NativeFile:
        """The file for pyarrow's CSV readers, which read ahead on Arrow's own threads.

        Never a Python file object: Arrow's threads would call back into Python for every block, and
        one still reading when the interpreter exits waits for the GIL for ever (``python -m
        data.prepare`` hung after reporting a malformed file, issue #20). Not closed here: Arrow
        closes the descriptor when its last reader lets go, so a read still in flight after a parse
        error never meets a closed (or reused) descriptor.
        """
        if self.member is None:
            return pa.OSFile(str(self.path))
        with zipfile.ZipFile(self.path) as archive:
            data = archive.read(self.member)
        # Copied into Arrow's memory: a buffer over Python bytes takes the GIL to be released, which
        # Arrow's threads may do at exit too.
        buffer = pa.allocate_buffer(len(data))
        pa.FixedSizeBufferWriter(buffer).write(data)
        return pa.BufferReader(buffer)

    def unterminated_last_line(self) -> str | None:
        """The last line when the file does not end with a line break, else None. Reads the tail only
        (a zip member is read whole, as ``open`` does)."""
        with self.open() as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
        if tail == b"" or tail.endswith((b"\n", b"\r")):
            return None
        return re.split(rb"[\r\n]", tail)[-1].decode("utf-8", errors="replace")


_TAIL_BYTES = 1 << 16
"""Enough to hold any last line of a rating file; longer is only cut short in an error message."""


# --- ratings ------------------------------------------------------------------------------------
def read_ratings(file: Path | TextFile, fmt: Format) -> pd.DataFrame:
    """Reads a rating file into a ``COLUMNS`` frame in file order.

    Raises:
        MalformedFileError: naming the file, the 1-based line and the expected layout, for a wrong
            header, a wrong number of fields, a bad number or an empty id; or when there are no rows.
    """
    file = file if isinstance(file, TextFile) else TextFile(Path(file))
    layout = LAYOUTS[Format(fmt)]
    try:
        frame = _parse_fast(file, layout)
    except _BadRow as error:
        raise _locate_error(file, layout, error, error.line) from None
    except pa.ArrowInvalid as error:
        raise _locate_error(file, layout, error, _first_failing_line(file, layout)) from None
    if len(frame) == 0:
        raise _no_rows(file)
    _check_not_cut_off(file, layout, frame["timestamp"].to_numpy())
    return frame


class _BadRow(Exception):
    """The fast path found the (first) bad line itself."""

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}")
        self.line = line


def _no_rows(file: TextFile) -> MalformedFileError:
    return MalformedFileError(f"{file.name}: no interactions (the file has no data rows)")


def _column_names(layout: Layout) -> list[str]:
    # A two-character separator ("::") is read as ':' with an empty field between each pair: pyarrow
    # only splits on single characters, and checking those gap fields keeps a lone ':' an error.
    if layout.separator == "::":
        return ["user", "_g1", "item", "_g2", "rating", "_g3", "timestamp"]
    return ["user", "item", "rating", "timestamp"]


def _csv_options(layout: Layout) -> dict[str, object]:
    names = _column_names(layout)
    id_type = pa.string() if layout.string_ids else pa.int64()
    types = {"user": id_type, "item": id_type, "rating": pa.float64(), "timestamp": pa.int64()}
    types.update({n: pa.string() for n in names if n.startswith("_g")})
    return {
        "read_options": pacsv.ReadOptions(column_names=names, skip_rows=int(layout.header is not None)),
        "parse_options": pacsv.ParseOptions(
            delimiter=layout.separator[0],
            quote_char='"' if layout.quoted else False,
            ignore_empty_lines=False,  # so data row i is line i + 1 (+ 1 for a header), always
        ),
        "convert_options": pacsv.ConvertOptions(
            column_types=types, null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    }


def _parse_fast(file: TextFile, layout: Layout) -> pd.DataFrame:
    header_lines = int(layout.header is not None)
    source = file.arrow_input()
    if layout.header is not None and _first_line(source) != layout.header:
        raise _BadRow(1)
    table = pacsv.read_csv(source, **_csv_options(layout))
    # What pyarrow accepts but the formats do not: NaN/inf ratings, times out of range, empty ids,
    # text in the gaps.
    bad = ~np.isfinite(table.column("rating").to_numpy())
    stamps = table.column("timestamp").to_numpy()
    bad |= (stamps < 0) | (stamps >= MAX_TIMESTAMP)
    for name in table.column_names:
        if name.startswith("_g"):
            bad |= pc.not_equal(table.column(name), "").to_numpy()
        elif name in ("user", "item") and layout.string_ids:
            bad |= pc.equal(table.column(name), "").to_numpy()
    if bad.any():
        raise _BadRow(int(np.flatnonzero(bad)[0]) + 1 + header_lines)
    frame = table.select(["user", "item", "timestamp", "rating"]).to_pandas()
    assert tuple(frame.columns) == COLUMNS
    return frame


def _check_not_cut_off(file: TextFile, layout: Layout, stamps: np.ndarray) -> None:
    """Rejects a file whose last row looks cut short inside its timestamp.

    A copy or download cut off mid-file ends inside its last row. Cut inside the timestamp (the last
    field of every format), the row still parses: ``380,6586,4.0,10626`` is a good row with a 1970
    time. Content alone cannot tell it from a real row, so the rule takes two signs, each weak alone:
    - the file does not end with a line break. A cut file almost never does, but many complete
      files lack the final line break too;
    - the last timestamp has fewer digits than every other row's. Dropping digits divides a time by
      10 or more, so a cut timestamp is shorter than the one written; in a complete file, the last
      row is rarely the one event written with fewer digits than all others (ML-20m spans 9 and 10).
    A row that really is as written is accepted once the file ends with a line break, as the error
    says: so no complete file is refused for good, and a file that ends with one is never checked.
    Cuts that keep as many digits as the shortest other timestamp are not caught.
    """
    if len(stamps) < 2:
        return  # nothing to compare with
    last, shortest = _digits(int(stamps[-1])), _digits(int(stamps[:-1].min()))  # stamps are >= 0
    if last >= shortest:
        return
    text = file.unterminated_last_line()
    if text is None:
        return
    line = len(stamps) + int(layout.header is not None)
    raise MalformedFileError(
        f"{file.name} line {line}: the file ends inside this row, it looks cut off: {layout.fields[3]} "
        f"{int(stamps[-1])} has {last} digits where every other row's has at least {shortest}, and the "
        f"line has no line break: {text!r}. Restore the file's end; if the row is right as written, "
        f"end the file with a line break."
    )


def _digits(value: int) -> int:
    return len(str(value))


def _first_failing_line(file: TextFile, layout: Layout) -> int:
    """The first line of the first block pyarrow cannot read: the bad line is in that block, so the
    slow line scan can start there instead of at the top of a multi-GB file."""
    rows = 0
    try:
        # Closed on the error too, so its readahead stops here rather than running on to the exit.
        with pacsv.open_csv(file.arrow_input(), **_csv_options(layout)) as reader:
            for batch in reader:
                rows += batch.num_rows
    except pa.ArrowInvalid:
        pass  # raised by the first block it cannot read (by open_csv itself when that is the first)
    return rows + 1 + int(layout.header is not None)


_HEAD_BYTES = 1 << 16
"""Enough for any header line; a longer first line is not the header anyway."""


def _first_line(source: pa.NativeFile) -> str:
    """The first line, BOM and line end stripped; ``source`` is left at its start."""
    head = source.read(_HEAD_BYTES)
    source.seek(0)
    return head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r").lstrip("\ufeff")


def _locate_error(
    file: TextFile, layout: Layout, fast_error: Exception, from_line: int
) -> MalformedFileError:
    """Scans lines from ``from_line`` on (then, to be safe, from the top) for the first bad one."""
    for start in [from_line, 1] if from_line > 1 else [1]:
        lineno = 0
        with file.open() as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno < start:
                    continue
                problem = _check_line(raw, lineno, layout)
                if problem is not None:
                    return MalformedFileError(f"{file.name} line {lineno}: {problem}")
        if lineno == int(layout.header is not None):
            return _no_rows(file)
    # The line scan is at least as strict as the fast reader, so this means a reader bug.
    return MalformedFileError(f"{file.name}: expected {layout.expected}; could not read it: {fast_error}")


_INT = re.compile(r"\s*-?\d+\s*")


def _check_line(raw: bytes, lineno: int, layout: Layout) -> str | None:
    """Why this line breaks the layout, or None."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return f"expected {layout.expected}, got bytes that are not UTF-8: {raw!r}"
    if lineno == 1 and layout.header is not None:
        text = text.lstrip("\ufeff")
        return None if text == layout.header else f"expected the header {layout.header!r}, got {text!r}"
    if text == "":
        return f"expected {layout.expected}, got an empty line"
    quoted = layout.quoted and '"' in text  # the csv module is slow; most lines need no unquoting
    fields = next(csv.reader([text])) if quoted else text.split(layout.separator)
    if len(fields) != len(layout.fields):
        return f"expected {layout.expected}, got {len(fields)} fields: {text!r}"
    for name, value, kind in zip(layout.fields, fields, ("id", "id", "float", "int"), strict=True):
        if kind == "id":
            kind = "string" if layout.string_ids else "int"
        if not _VALID[kind](value):
            return f"expected {layout.expected}; {name} {value!r} is not {_WHAT[kind]}: {text!r}"
    if not 0 <= int(fields[3]) < MAX_TIMESTAMP:
        return (f"{layout.fields[3]} {fields[3]!r} is not a time (whole seconds in [0, 2**53) expected, "
                f"the range serving accepts): {text!r}")
    return None


def _is_finite_float(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


_VALID = {
    "string": lambda value: value != "",
    "float": _is_finite_float,
    "int": lambda value: _INT.fullmatch(value) is not None and -(2**63) <= int(value) < 2**63,
}
_WHAT = {"string": "an id", "float": "a finite number", "int": "an integer"}


# --- titles -------------------------------------------------------------------------------------
def read_titles(file: Path | TextFile) -> pd.DataFrame:
    """Reads MovieLens movies.csv (movieId,title,genres) or movies.dat (MovieID::Title::Genres).

    Returns a frame (item int64, title str). movies.dat of ml-1m is Latin-1, later releases UTF-8.
    """
    file = file if isinstance(file, TextFile) else TextFile(Path(file))
    with file.open() as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    dat = file.name.endswith(".dat")
    expected = "MovieID::Title::Genres (3 fields)" if dat else "movieId,title,genres (3 fields)"
    # Not splitlines(): it also breaks at \x85 and friends, which Latin-1 titles may hold.
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if dat:
        rows = ((n, line.split("::")) for n, line in enumerate(lines, start=1))
    else:
        if not lines or lines[0].lstrip("\ufeff") != "movieId,title,genres":
            raise MalformedFileError(f"{file.name} line 1: expected the header 'movieId,title,genres'")
        rows = ((n, fields) for n, fields in enumerate(csv.reader(lines[1:]), start=2))
    items, titles = [], []
    for lineno, fields in rows:
        if len(fields) != 3 or _INT.fullmatch(fields[0]) is None:
            got = lines[lineno - 1]
            raise MalformedFileError(f"{file.name} line {lineno}: expected {expected}, got {got!r}")
        items.append(int(fields[0]))
        titles.append(fields[1])
    return pd.DataFrame({"item": np.array(items, dtype=np.int64), "title": pd.array(titles, dtype="str")})


# --- a file on disk as a dataset source ---------------------------------------------------------
TITLE_FILES = {Format.MOVIELENS_CSV: "movies.csv", Format.MOVIELENS_DAT: "movies.dat"}


def detect_format(path: Path) -> Format:
    """Tells the format from the file's first line."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")
    for fmt in (Format.MOVIELENS_CSV, Format.RECBOLE_INTER):
        if first == LAYOUTS[fmt].header:
            return fmt
    if first.count("::") == 3:
        return Format.MOVIELENS_DAT
    if first.count(",") == 3:
        return Format.AMAZON_CSV
    raise MalformedFileError(f"{path} line 1: cannot tell its format from {first!r}; pass --format")


def find_ratings_file(path: Path) -> Path:
    """A folder stands for the ratings.csv or ratings.dat inside it."""
    path = Path(path)
    if path.is_dir():
        for name in ("ratings.csv", "ratings.dat"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds neither ratings.csv nor ratings.dat")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


class FileSource(DatasetSource):
    """A rating file on disk, with the MovieLens titles file beside it when there is one.

    Example::

        >>> src = FileSource(Path("ml-20m"))                   # doctest: +SKIP
        >>> src.name, src.format                               # doctest: +SKIP
        ('ml-20m', <Format.MOVIELENS_CSV: 'movielens-csv'>)
    """

    def __init__(self, path: Path | str, fmt: Format | str | None = None, name: str | None = None) -> None:
        self.path = find_ratings_file(Path(path))
        self.format = Format(fmt) if fmt is not None else detect_format(self.path)
        # ratings.csv is named for its folder (ml-20m/ratings.csv -> "ml-20m"); other files for themselves.
        default = self.path.parent.name if self.path.stem == "ratings" else self.path.stem
        self.name = name or default or "dataset"
        beside = self.path.parent / TITLE_FILES.get(self.format, "")
        self.titles_path = beside if self.format in TITLE_FILES and beside.is_file() else None
        self._checksum: tuple[str, str] | None = None  # (fingerprint, sha256): hash big files once

    @property
    def inputs(self) -> list[Path]:
        return [self.path] + ([self.titles_path] if self.titles_path is not None else [])

    def fingerprint(self) -> str:
        return stat_fingerprint(self.inputs)

    def checksum(self) -> str:
        fingerprint = self.fingerprint()
        if self._checksum is None or self._checksum[0] != fingerprint:
            self._checksum = (fingerprint, sha256_files(self.inputs))
        return self._checksum[1]

    def load(self) -> Interactions:
        frame = read_ratings(self.path, self.format)
        titles = read_titles(self.titles_path) if self.titles_path is not None else None
        return Interactions(
            frame,
            source=f"{self.format.value}:{self.path}",
            path=self.path,
            checksum=self.checksum(),
            titles=titles,
            raw_item_kind=RAW_ITEM_KINDS[self.format],
        )
