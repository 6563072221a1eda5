"""Readers for the event-log formats we train on: streamed in blocks, precise about bad rows.

Every reader yields Arrow record batches of one event per row with the columns

    user        int64 | string   raw user id
    item        int64 | string   raw item id
    timestamp   int64            whole seconds in [0, 2**53)
    rating      float64          only when the file has ratings (explicit feedback)
    event_type  string           only when an event-type column is mapped

in file order, a block at a time, so a file of any size is read in bounded memory. Formats:

    movielens-csv   ratings.csv of ml-latest(-small), ml-20m, ml-25m: header userId,movieId,rating,timestamp
    movielens-dat   ratings.dat of ml-1m, ml-10m: UserID::MovieID::Rating::Timestamp, no header
    amazon-csv      Amazon "ratings only" CSV (e.g. ratings_Books.csv): user,item,rating,timestamp, no header
    recbole-inter   RecBole atomic .inter file: tab-separated, typed header user_id:token ...
    csv             any CSV (standard quoting, any delimiter) whose columns ``Columns`` maps: a header
                    line names them (quoted or not), or ``ReadOptions.column_names`` for a file without
    parquet         any Parquet file whose columns ``Columns`` maps; ids of integer or string type,
                    timestamps as integer seconds or an Arrow timestamp/date type

A file without a rating column is implicit feedback (``rating`` is then absent). For csv, ids are read
as strings unless ``ReadOptions.id_type`` is "int" (faster and numerically ordered, but "007" reads
as 7): Parquet ids keep the column's type.

Errors name the file and the line (Parquet: the row): the fast path is pyarrow's streaming CSV reader
(multithreaded, strict about numbers); only when it fails, or a value it let through is not allowed
(NaN rating, empty id, negative time), do we look at lines one by one, from the start of the block it
choked on, so even a broken 30 GB file is reported in seconds. A text file that looks cut off inside
its last row is refused too (see ``_check_not_cut_off``).

Example::

    >>> for batch in read_events(Path("ml-latest-small/ratings.csv"), Format.MOVIELENS_CSV):  # doctest: +SKIP
    ...     batch.schema.names                                                             # doctest: +SKIP
    ['user', 'item', 'timestamp', 'rating']
    >>> frame = read_ratings(Path("ml-latest-small/ratings.csv"), Format.MOVIELENS_CSV)   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.interactions import (
    COLUMNS,
    DatasetSource,
    EventStream,
    Interactions,
    sha256_files,
    stat_fingerprint,
)

MAX_TIMESTAMP = 2**53
"""Timestamps are whole seconds in [0, MAX_TIMESTAMP): the range serving accepts
(``serving.validation.MAX_TIMESTAMP``), so nothing is trained on a time a request could not carry."""

BLOCK_BYTES = 32 << 20
"""Bytes of text per CSV block (about a million rows): large enough that the per-block work in Python
is negligible, small enough to bound memory."""
PARQUET_BATCH_ROWS = 1 << 20


class Format(StrEnum):
    MOVIELENS_CSV = "movielens-csv"
    MOVIELENS_DAT = "movielens-dat"
    AMAZON_CSV = "amazon-csv"
    RECBOLE_INTER = "recbole-inter"
    CSV = "csv"
    PARQUET = "parquet"


FIXED_FORMATS = (Format.MOVIELENS_CSV, Format.MOVIELENS_DAT, Format.AMAZON_CSV, Format.RECBOLE_INTER)
"""Formats whose columns are fixed (user, item, rating, timestamp); ``Columns`` maps the others'."""


class IdType(StrEnum):
    STRING = "string"
    INT = "int"


class MalformedFileError(ValueError):
    """An event file that does not follow its format; the message names the file and the line (row)."""


@dataclass(frozen=True)
class Columns:
    """Which column of a csv or Parquet file holds what.

    ``rating``: "" (the default) takes a column named "rating" when the file has one; the events are
    implicit feedback otherwise. A name given here must exist. ``event_type``: "" for none.
    """

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str = ""
    event_type: str = ""


@dataclass(frozen=True)
class ReadOptions:
    """How to read a file, beyond its format (all but ``implicit`` matter to csv/Parquet only).

    Attributes:
        columns: the column mapping (csv, parquet).
        implicit: ignore any rating column: every event is an interaction, nothing more.
        id_type: csv only: "string" (exact) or "int" (faster, numeric order; leading zeros are lost).
        delimiter: csv only.
        column_names: csv only: the names of a file without a header line (then none is skipped).
    """

    columns: Columns = field(default_factory=Columns)
    implicit: bool = False
    id_type: IdType = IdType.STRING
    delimiter: str = ","
    column_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layout:
    """How one text format writes a row."""

    fields: tuple[str, ...]
    """The file's columns in order, as the format (or the header line) names them; error messages use them."""
    separator: str
    header: str | None
    """The exact first line a fixed format starts with (checked; for quoted formats after unquoting),
    else None."""
    string_ids: bool
    """Ids are kept as strings (Amazon ASINs have leading zeros); otherwise they must be integers."""
    quoted: bool
    """CSV quoting applies (a field may be wrapped in double quotes)."""
    roles: tuple[tuple[str, str], ...] = ()
    """(role, field) for each column read: roles are "user", "item", "timestamp", "rating", "event_type"."""
    skip_header: bool = False
    """The first line is a header that named ``fields`` (csv): skipped, not checked against anything."""

    @property
    def expected(self) -> str:
        shown = "<tab>" if self.separator == "\t" else self.separator
        return f"{shown.join(self.fields)} ({len(self.fields)} fields)"

    @property
    def header_lines(self) -> int:
        return int(self.header is not None or self.skip_header)

    def field_of(self, role: str) -> str | None:
        return dict(self.roles).get(role)


_FIXED_ROLES = ("user", "item", "rating", "timestamp")


def _fixed(fields: tuple[str, str, str, str], **kwargs: object) -> Layout:
    return Layout(fields=fields, roles=tuple(zip(_FIXED_ROLES, fields, strict=True)), **kwargs)  # type: ignore[arg-type]


LAYOUTS: dict[Format, Layout] = {
    Format.MOVIELENS_CSV: _fixed(
        ("userId", "movieId", "rating", "timestamp"),
        separator=",",
        header="userId,movieId,rating,timestamp",
        string_ids=False,
        quoted=True,
    ),
    Format.MOVIELENS_DAT: _fixed(
        ("UserID", "MovieID", "Rating", "Timestamp"), separator="::", header=None, string_ids=False, quoted=False
    ),
    Format.AMAZON_CSV: _fixed(
        ("user", "item", "rating", "timestamp"), separator=",", header=None, string_ids=True, quoted=True
    ),
    Format.RECBOLE_INTER: _fixed(
        ("user_id", "item_id", "rating", "timestamp"),
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

    def first_line(self) -> str:
        """The first line, BOM and line end stripped."""
        with self.open() as f:
            head = f.read(_HEAD_BYTES)
        return _decode_first_line(head)

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
"""Enough to hold any last line of an event file; longer is only cut short in an error message."""
_HEAD_BYTES = 1 << 16
"""Enough for any header line; a longer first line is not the header anyway."""


def _decode_first_line(head: bytes) -> str:
    return head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r").lstrip("\ufeff")


def _unquoted(line: str, separator: str) -> list[str]:
    """The fields of one CSV line, quotes removed (a one-character separator)."""
    return next(csv.reader([line], delimiter=separator), [])


# --- layouts of the csv format ------------------------------------------------------------------
def csv_layout(file: TextFile, options: ReadOptions) -> Layout:
    """The layout of a csv file: its fields from the header line (or ``options.column_names``), and
    the roles from ``options.columns``.

    Raises:
        MalformedFileError: when a mapped column is not in the file (naming the columns it has).
    """
    if len(options.delimiter) != 1:
        raise ValueError(f"the csv delimiter must be one character, got {options.delimiter!r}")
    if options.column_names:
        fields, skip = tuple(options.column_names), False
        where = f"{file.name}: the given column names {list(fields)}"
    else:
        line = file.first_line()
        if line == "":
            raise MalformedFileError(f"{file.name} line 1: expected a header line naming the columns, "
                                     "got an empty line")
        fields, skip = tuple(_unquoted(line, options.delimiter)), True
        where = f"{file.name} line 1: the header {list(fields)}"
    duplicated = sorted({f for f in fields if fields.count(f) > 1})
    if duplicated:
        raise MalformedFileError(f"{where} names {duplicated} more than once")
    roles = _map_roles(set(fields), options, where)
    return Layout(fields=fields, separator=options.delimiter, header=None,
                  string_ids=options.id_type is IdType.STRING, quoted=True, roles=roles, skip_header=skip)


def _map_roles(names: set[str], options: ReadOptions, where: str) -> tuple[tuple[str, str], ...]:
    """(role, column) pairs of the mapping that apply to a file with these column names."""
    c = options.columns
    roles: list[tuple[str, str]] = []
    for role, name in (("user", c.user), ("item", c.item), ("timestamp", c.timestamp)):
        if name not in names:
            raise MalformedFileError(f"{where} has no column {name!r} for the {role}s; map the columns "
                                     f"(data.columns.{role} in a config, --{role}-column on the command line)")
        roles.append((role, name))
    if c.rating:
        if c.rating not in names:
            raise MalformedFileError(f"{where} has no rating column {c.rating!r} (leave data.columns.rating "
                                     f"empty for implicit feedback)")
        if not options.implicit:
            roles.append(("rating", c.rating))
    elif "rating" in names and not options.implicit:
        roles.append(("rating", "rating"))
    if c.event_type:
        if c.event_type not in names:
            raise MalformedFileError(f"{where} has no event-type column {c.event_type!r}")
        roles.append(("event_type", c.event_type))
    mapped = [name for _, name in roles]
    if len(set(mapped)) != len(mapped):
        raise MalformedFileError(f"{where}: the mapping {dict(roles)} uses a column twice")
    return tuple(roles)


def layout_for(file: TextFile, fmt: Format, options: ReadOptions = ReadOptions()) -> Layout:
    fmt = Format(fmt)
    if fmt is Format.CSV:
        return csv_layout(file, options)
    if fmt is Format.PARQUET:
        raise ValueError("Parquet files have no text layout")
    layout = LAYOUTS[fmt]
    if options.implicit:
        layout = replace(layout, roles=tuple(r for r in layout.roles if r[0] != "rating"))
    return layout


# --- reading text -------------------------------------------------------------------------------
def _arrow_names(layout: Layout) -> list[str]:
    """The names pyarrow gives the file's columns: the role of a mapped one, ``_c<i>`` otherwise.

    A two-character separator ("::") is read as ':' with an empty field between each pair: pyarrow
    only splits on single characters, and checking those gap fields keeps a lone ':' an error."""
    by_field = {f: role for role, f in layout.roles}
    names = [by_field.get(f, f"_c{i}") for i, f in enumerate(layout.fields)]
    if layout.separator == "::":
        gapped = []
        for i, name in enumerate(names):
            gapped += [name] if i == 0 else [f"_g{i}", name]
        return gapped
    return names


def _csv_options(layout: Layout, block_size: int | None = None) -> dict[str, object]:
    names = _arrow_names(layout)
    block_size = block_size or BLOCK_BYTES
    id_type = pa.string() if layout.string_ids else pa.int64()
    all_types = {"user": id_type, "item": id_type, "rating": pa.float64(), "timestamp": pa.int64(),
                 "event_type": pa.string()}
    read = [n for n in names if n in all_types or n.startswith("_g")]
    types = {n: all_types.get(n, pa.string()) for n in read}
    return {
        "read_options": pacsv.ReadOptions(column_names=names, skip_rows=layout.header_lines, block_size=block_size),
        "parse_options": pacsv.ParseOptions(
            delimiter=layout.separator[0],
            quote_char='"' if layout.quoted else False,
            ignore_empty_lines=False,  # so data row i is line i + 1 (+ 1 for a header), always
        ),
        "convert_options": pacsv.ConvertOptions(
            column_types=types, include_columns=read, null_values=[], strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    }


def _header_matches(line: str, layout: Layout) -> bool:
    if layout.header is None:
        return True
    if line == layout.header:
        return True
    # A quoted header ("userId","movieId",...: how pyarrow and pandas may write it) is the same header.
    return layout.quoted and layout.separator.join(_unquoted(line, layout.separator)) == layout.header


def read_text_events(
    file: Path | TextFile, layout: Layout, *, block_size: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Streams a text file as standard event batches (see the module docstring).

    Raises:
        MalformedFileError: naming the file, the 1-based line and the expected layout, for a wrong
            header, a wrong number of fields, a bad number or an empty id; or when there are no rows.
    """
    file = file if isinstance(file, TextFile) else TextFile(Path(file))
    if not _header_matches(file.first_line(), layout):
        raise _locate_error(file, layout, "the header differs", 1)
    rows, cut = 0, _CutOffCheck()
    # Closed on the way out (an error, or a consumer that stops early), so its readahead stops there
    # rather than running on to the exit.
    try:
        reader = pacsv.open_csv(file.arrow_input(), **_csv_options(layout, block_size))
    except pa.ArrowInvalid as error:  # open_csv reads (and may choke on) the first block
        raise _locate_error(file, layout, error, 1 + layout.header_lines) from None
    with reader:
        blocks = iter(reader)
        while True:
            try:
                batch = next(blocks)
            except StopIteration:
                break
            except pa.ArrowInvalid as error:
                raise _locate_error(file, layout, error, rows + 1 + layout.header_lines) from None
            if batch.num_rows == 0:
                continue
            bad = _first_bad_row(batch, layout)
            if bad >= 0:
                raise _locate_error(file, layout, "a value is out of range", rows + bad + 1 + layout.header_lines)
            standard = _standard_batch(batch)
            cut.add(standard.column("timestamp").to_numpy())
            yield standard
            rows += batch.num_rows
    if rows == 0:
        raise _no_rows(file)
    cut.check(file, layout, rows)


def _standard_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    names = [n for n in ("user", "item", "timestamp", "rating", "event_type") if n in batch.schema.names]
    return pa.RecordBatch.from_arrays([batch.column(n) for n in names], names=names)


def _first_bad_row(batch: pa.RecordBatch, layout: Layout) -> int:
    """Index of the first row that pyarrow read but the format forbids (NaN/inf rating, time out of
    range, empty id, text in the gaps), or -1."""
    names = batch.schema.names
    bad = np.zeros(batch.num_rows, dtype=bool)
    if "rating" in names:
        bad |= ~np.isfinite(batch.column("rating").to_numpy())
    stamps = batch.column("timestamp").to_numpy()
    bad |= (stamps < 0) | (stamps >= MAX_TIMESTAMP)
    for name in names:
        if name.startswith("_g"):
            bad |= pc.not_equal(batch.column(name), "").to_numpy(zero_copy_only=False)
        elif name in ("user", "item") and layout.string_ids:
            bad |= pc.equal(batch.column(name), "").to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(bad)[0]) if bad.any() else -1


class _CutOffCheck:
    """Follows the timestamps as they stream by, for ``_check_not_cut_off``: the last one, and the
    smallest of all the others."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.smallest_other: int | None = None

    def add(self, stamps: np.ndarray) -> None:
        if stamps.size == 0:
            return
        others = [int(stamps[:-1].min())] if stamps.size > 1 else []
        if self.last is not None:
            others.append(self.last)
        if others:
            low = min(others)
            self.smallest_other = low if self.smallest_other is None else min(self.smallest_other, low)
        self.last = int(stamps[-1])

    def check(self, file: TextFile, layout: Layout, rows: int) -> None:
        if self.last is None or self.smallest_other is None:
            return  # a single row: nothing to compare with
        _check_not_cut_off(file, layout, self.last, self.smallest_other, rows)


def _check_not_cut_off(file: TextFile, layout: Layout, last_stamp: int, smallest_other: int, rows: int) -> None:
    """Rejects a file whose last row looks cut short inside its timestamp.

    A copy or download cut off mid-file ends inside its last row. Cut inside the timestamp (the last
    field of every fixed format), the row still parses: ``380,6586,4.0,10626`` is a good row with a
    1970 time. Content alone cannot tell it from a real row, so the rule takes two signs, each weak alone:
    - the file does not end with a line break. A cut file almost never does, but many complete
      files lack the final line break too;
    - the last timestamp has fewer digits than every other row's. Dropping digits divides a time by
      10 or more, so a cut timestamp is shorter than the one written; in a complete file, the last
      row is rarely the one event written with fewer digits than all others (ML-20m spans 9 and 10).
    A row that really is as written is accepted once the file ends with a line break, as the error
    says: so no complete file is refused for good, and a file that ends with one is never checked.
    Cuts that keep as many digits as the shortest other timestamp are not caught. Only where the
    timestamp is the last field of a row (a cut elsewhere fails to parse anyway).
    """
    if layout.field_of("timestamp") != layout.fields[-1]:
        return
    last, shortest = _digits(last_stamp), _digits(smallest_other)  # stamps are >= 0
    if last >= shortest:
        return
    text = file.unterminated_last_line()
    if text is None:
        return
    line = rows + layout.header_lines
    raise MalformedFileError(
        f"{file.name} line {line}: the file ends inside this row, it looks cut off: {layout.fields[-1]} "
        f"{last_stamp} has {last} digits where every other row's has at least {shortest}, and the "
        f"line has no line break: {text!r}. Restore the file's end; if the row is right as written, "
        f"end the file with a line break."
    )


def _digits(value: int) -> int:
    return len(str(value))


def _no_rows(file: TextFile | Path) -> MalformedFileError:
    name = file.name if isinstance(file, TextFile) else str(file)
    return MalformedFileError(f"{name}: no interactions (the file has no data rows)")


def _skip_lines(f: BinaryIO, count: int) -> None:
    """Moves ``f`` past its first ``count`` lines, counting line breaks a large block at a time."""
    left = count
    while left > 0:
        start = f.tell()
        chunk = f.read(1 << 23)
        if not chunk:
            return
        breaks = chunk.count(b"\n")
        if breaks < left:
            left -= breaks
            continue
        pos = -1
        for _ in range(left):
            pos = chunk.index(b"\n", pos + 1)
        f.seek(start + pos + 1)
        return


def _locate_error(file: TextFile, layout: Layout, fast_error: object, from_line: int) -> MalformedFileError:
    """Scans lines from ``from_line`` on (then, to be safe, from the top) for the first bad one."""
    for start in [from_line, 1] if from_line > 1 else [1]:
        lineno = start - 1
        with file.open() as f:
            _skip_lines(f, start - 1)
            for lineno, raw in enumerate(f, start=start):
                problem = _check_line(raw, lineno, layout)
                if problem is not None:
                    return MalformedFileError(f"{file.name} line {lineno}: {problem}")
        if lineno == layout.header_lines and start == 1:
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
        return None if _header_matches(text, layout) else f"expected the header {layout.header!r}, got {text!r}"
    if lineno == 1 and layout.skip_header:
        return None
    if text == "":
        return f"expected {layout.expected}, got an empty line"
    quoted = layout.quoted and '"' in text  # the csv module is slow; most lines need no unquoting
    fields = _unquoted(text, layout.separator) if quoted else text.split(layout.separator)
    if len(fields) != len(layout.fields):
        return f"expected {layout.expected}, got {len(fields)} fields: {text!r}"
    kinds = {f: _ROLE_KINDS[role] for role, f in layout.roles}
    for name, value in zip(layout.fields, fields, strict=True):
        kind = kinds.get(name)
        if kind is None:
            continue
        if kind == "id":
            kind = "string" if layout.string_ids else "int"
        if not _VALID[kind](value):
            return f"expected {layout.expected}; {name} {value!r} is not {_WHAT[kind]}: {text!r}"
    time_field = layout.field_of("timestamp")
    value = fields[layout.fields.index(time_field)] if time_field is not None else "0"
    if not 0 <= int(value) < MAX_TIMESTAMP:
        return (f"{time_field} {value!r} is not a time (whole seconds in [0, 2**53) expected, "
                f"the range serving accepts): {text!r}")
    return None


def _is_finite_float(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


_ROLE_KINDS = {"user": "id", "item": "id", "rating": "float", "timestamp": "int", "event_type": "any"}
_VALID: dict[str, Callable[[str], bool]] = {
    "string": lambda value: value != "",
    "float": _is_finite_float,
    "int": lambda value: _INT.fullmatch(value) is not None and -(2**63) <= int(value) < 2**63,
    "any": lambda value: True,
}
_WHAT = {"string": "an id", "float": "a finite number", "int": "an integer"}


# --- reading Parquet ----------------------------------------------------------------------------
_TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def read_parquet_events(path: Path, options: ReadOptions = ReadOptions(), *,
                        batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Streams a Parquet file as standard event batches, ``batch_rows`` rows at a time.

    Raises:
        MalformedFileError: naming the file and the 1-based row, for a null, an empty id, a time out
            of range or a rating that is not a finite number; or for a column the mapping names that
            the file lacks or whose type cannot hold it.
    """
    path = Path(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise MalformedFileError(f"{path}: not a readable Parquet file: {error}") from None
    schema = parquet.schema_arrow
    where = f"{path}: the columns {schema.names}"
    roles = dict(_map_roles(set(schema.names), options, where))
    for role, name in roles.items():
        problem = _parquet_type_problem(role, schema.field(name).type)
        if problem:
            raise MalformedFileError(f"{path}: column {name!r} ({role}) is {schema.field(name).type}: {problem}")
    rows = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(roles.values()), use_threads=True):
            yield _parquet_batch(path, batch, roles, rows)
            rows += batch.num_rows
    if rows == 0:
        raise _no_rows(path)


def _is_stringy(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _parquet_type_problem(role: str, t: pa.DataType) -> str:
    if role in ("user", "item"):
        return "" if pa.types.is_integer(t) or _is_stringy(t) else "ids must be integers or strings"
    if role == "timestamp":
        ok = pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_date(t)
        return "" if ok else "times must be integer seconds, a timestamp or a date"
    if role == "rating":
        return "" if pa.types.is_integer(t) or pa.types.is_floating(t) else "ratings must be numbers"
    return "" if _is_stringy(t) else "event types must be strings"


def _parquet_batch(path: Path, batch: pa.RecordBatch, roles: dict[str, str], before: int) -> pa.RecordBatch:
    def fail(i: int, what: str) -> MalformedFileError:
        return MalformedFileError(f"{path} row {before + i + 1}: {what}")

    columns: dict[str, pa.Array] = {}
    for role, name in roles.items():
        column = batch.column(name)
        if column.null_count:
            i = int(np.flatnonzero(~pc.is_valid(column).to_numpy(zero_copy_only=False))[0])
            raise fail(i, f"{name} ({role}) is null")
        t = column.type
        if role in ("user", "item", "event_type"):
            if _is_stringy(t):
                column = pc.cast(column, pa.string())
                empty = pc.equal(column, "").to_numpy(zero_copy_only=False)
                if role != "event_type" and empty.any():
                    raise fail(int(np.flatnonzero(empty)[0]), f"{name} '' is not an id")
            else:
                column = pc.cast(column, pa.int64())
        elif role == "timestamp":
            if pa.types.is_timestamp(t):
                raw = pc.cast(column, pa.int64()).to_numpy()
                column = pa.array(np.floor_divide(raw, _TIME_UNITS[t.unit]))
            elif pa.types.is_date(t):
                days = pc.cast(pc.cast(column, pa.date32()), pa.int32()).to_numpy()
                column = pa.array(days.astype(np.int64) * 86_400)
            else:
                column = pc.cast(column, pa.int64())  # uint64 past int64 fails here (not a time anyway)
            stamps = column.to_numpy()
            out = (stamps < 0) | (stamps >= MAX_TIMESTAMP)
            if out.any():
                i = int(np.flatnonzero(out)[0])
                raise fail(i, f"{name} {int(stamps[i])} is not a time (whole seconds in [0, 2**53) expected, "
                              "the range serving accepts)")
        elif role == "rating":
            column = pc.cast(column, pa.float64())
            values = column.to_numpy()
            bad = ~np.isfinite(values)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise fail(i, f"{name} {float(values[i])!r} is not a finite number")
        columns[role] = column
    names = [n for n in ("user", "item", "timestamp", "rating", "event_type") if n in columns]
    return pa.RecordBatch.from_arrays([columns[n] for n in names], names=names)


# --- one entry point ----------------------------------------------------------------------------
def read_events(file: Path | TextFile, fmt: Format | str, options: ReadOptions = ReadOptions(), *,
                block_size: int | None = None) -> Iterator[pa.RecordBatch]:
    """The events of a file in any format, as standard batches in file order (module docstring)."""
    fmt = Format(fmt)
    if fmt is Format.PARQUET:
        if isinstance(file, TextFile):
            if file.member is not None:
                raise ValueError("Parquet inside a zip archive is not supported")
            file = file.path
        return read_parquet_events(Path(file), options)
    file = file if isinstance(file, TextFile) else TextFile(Path(file))
    return read_text_events(file, layout_for(file, fmt, options), block_size=block_size)


def read_ratings(file: Path | TextFile, fmt: Format | str, options: ReadOptions = ReadOptions()) -> pd.DataFrame:
    """Reads a whole event file into a ``COLUMNS`` frame in file order: for small files and tests
    (preparation streams instead). Without ratings, the rating column is NaN."""
    batches = list(read_events(file, fmt, options))
    table = pa.Table.from_batches(batches)
    if "rating" not in table.schema.names:
        table = table.append_column("rating", pa.array(np.full(table.num_rows, np.nan)))
    frame = table.select(list(COLUMNS)).to_pandas()
    for column in ("user", "item"):  # the str dtype pandas may choose for Arrow strings, as object
        if frame[column].dtype.kind not in "iu":
            frame[column] = frame[column].astype(object)
    return frame


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
        if not lines or _unquoted(lines[0].lstrip("\ufeff"), ",") != ["movieId", "title", "genres"]:
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
PARQUET_SUFFIXES = (".parquet", ".pq")


def detect_format(path: Path, options: ReadOptions = ReadOptions()) -> Format:
    """Tells the format from the file: Parquet by its name or magic bytes, text by its first line.

    A header line that names the mapped columns (quoted or not) is the csv format; so is any file
    when ``options`` asks for a delimiter other than "," or gives the column names.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if path.suffix.lower() in PARQUET_SUFFIXES or head.startswith(b"PAR1"):
        return Format.PARQUET
    if options.delimiter != "," or options.column_names:
        return Format.CSV
    first = _decode_first_line(head)
    fields = _unquoted(first, ",")
    if fields == list(LAYOUTS[Format.MOVIELENS_CSV].fields):
        return Format.MOVIELENS_CSV
    if first == LAYOUTS[Format.RECBOLE_INTER].header:
        return Format.RECBOLE_INTER
    if first.count("::") == 3:
        return Format.MOVIELENS_DAT
    c = options.columns
    if {c.user, c.item, c.timestamp} <= set(fields):
        return Format.CSV
    if first.count(",") == 3:
        return Format.AMAZON_CSV
    raise MalformedFileError(f"{path} line 1: cannot tell its format from {first!r}; pass --format "
                             f"(or name the columns: --user-column ...)")


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
    """An event file on disk, with the MovieLens titles file beside it when there is one.

    Example::

        >>> src = FileSource(Path("ml-20m"))                   # doctest: +SKIP
        >>> src.name, src.format                               # doctest: +SKIP
        ('ml-20m', <Format.MOVIELENS_CSV: 'movielens-csv'>)
    """

    def __init__(self, path: Path | str, fmt: Format | str | None = None, name: str | None = None,
                 options: ReadOptions = ReadOptions()) -> None:
        self.path = find_ratings_file(Path(path))
        self.options = options
        self.format = Format(fmt) if fmt else detect_format(self.path, options)
        # ratings.csv is named for its folder (ml-20m/ratings.csv -> "ml-20m"); other files for themselves.
        default = self.path.parent.name if self.path.stem == "ratings" else self.path.stem
        self.name = name or default or "dataset"
        beside = self.path.parent / TITLE_FILES.get(self.format, "")
        self.titles_path = beside if self.format in TITLE_FILES and beside.is_file() else None
        self._checksum: tuple[str, str] | None = None  # (fingerprint, sha256): hash big files once

    @property
    def inputs(self) -> list[Path]:
        return [self.path] + ([self.titles_path] if self.titles_path is not None else [])

    @property
    def raw_item_kind(self) -> str:
        return RAW_ITEM_KINDS.get(self.format, "item")

    def fingerprint(self) -> str:
        return stat_fingerprint(self.inputs)

    def checksum(self) -> str:
        fingerprint = self.fingerprint()
        if self._checksum is None or self._checksum[0] != fingerprint:
            self._checksum = (fingerprint, sha256_files(self.inputs))
        return self._checksum[1]

    def read_options(self) -> dict[str, object]:
        """What of ``options`` applies to this file's format (recorded in the manifest)."""
        o = self.options
        if self.format in FIXED_FORMATS:
            return {"format": self.format.value}
        mapping = {"user": o.columns.user, "item": o.columns.item, "timestamp": o.columns.timestamp,
                   "rating": o.columns.rating, "event_type": o.columns.event_type}
        out: dict[str, object] = {"format": self.format.value, "columns": mapping}
        if self.format is Format.CSV:
            out |= {"id_type": o.id_type.value, "delimiter": o.delimiter, "column_names": list(o.column_names)}
        return out

    def events(self) -> EventStream:
        titles = read_titles(self.titles_path) if self.titles_path is not None else None
        return EventStream(
            source=f"{self.format.value}:{self.path}",
            open=lambda: read_events(self.path, self.format, self.options),
            titles=titles,
            raw_item_kind=self.raw_item_kind,
        )

    def load(self) -> Interactions:
        frame = read_ratings(self.path, self.format, self.options)
        titles = read_titles(self.titles_path) if self.titles_path is not None else None
        return Interactions(
            frame,
            source=f"{self.format.value}:{self.path}",
            path=self.path,
            checksum=self.checksum(),
            titles=titles,
            raw_item_kind=self.raw_item_kind,
        )

