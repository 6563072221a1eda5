"""The events a source provides, in memory or streamed, and the contract a dataset source fulfils.

Preparation streams a source's events (``EventStream``: Arrow batches, read as often as needed), so a
file of any size is prepared in bounded memory. For small data and tests, ``Interactions`` is one
in-memory pandas table, one row per event in the order the source wrote
them, with the raw ids exactly as the source spells them (ints for MovieLens, strings for Amazon):

    user       int64 | str   raw user id
    item       int64 | str   raw item id
    timestamp  int64         seconds
    rating     float64

Example::

    >>> frame = pd.DataFrame({"user": [1, 1], "item": [10, 20], "timestamp": [5, 6], "rating": [4.0, 3.5]})
    >>> Interactions(frame, source="example", path=None, checksum="0" * 64).counts()
    Counts(interactions=2, users=1, items=2)
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

COLUMNS = ("user", "item", "timestamp", "rating")
"""The interactions table's columns, in this order."""
TITLE_COLUMNS = ("item", "title")
"""The optional titles table: raw item id (same dtype as ``Interactions.frame.item``) and its title."""


class Counts(NamedTuple):
    interactions: int
    users: int
    items: int


@dataclass
class Interactions:
    """One dataset's events as the source wrote them, plus where they came from.

    Attributes:
        frame: the ``COLUMNS`` table, in source order (that order breaks timestamp ties later).
        source: where it came from, for people: e.g. ``"movielens-csv:/data/ml-20m/ratings.csv"``.
        path: the file (or archive) that was read; None for generated data.
        checksum: sha256 of the input bytes (or of the generator's config), the cache key.
        titles: ``TITLE_COLUMNS`` table when the source ships item titles, else None.
        raw_item_kind: what the raw item ids are (e.g. "movieId", "title"), recorded in the manifest
            because the same dataset from two sources can key items differently.
    """

    frame: pd.DataFrame
    source: str
    path: Path | None
    checksum: str
    titles: pd.DataFrame | None = None
    raw_item_kind: str = "item"

    def __post_init__(self) -> None:
        if tuple(self.frame.columns) != COLUMNS:
            raise ValueError(f"interactions need columns {COLUMNS}, got {tuple(self.frame.columns)}")
        for column, kind in (("timestamp", "i"), ("rating", "f")):
            if self.frame[column].dtype.kind != kind:
                raise TypeError(f"column {column!r} must be {kind!r}-kind, got {self.frame[column].dtype}")
        if self.titles is not None and tuple(self.titles.columns) != TITLE_COLUMNS:
            raise ValueError(f"titles need columns {TITLE_COLUMNS}, got {tuple(self.titles.columns)}")

    def __len__(self) -> int:
        return len(self.frame)

    def counts(self) -> Counts:
        return Counts(len(self.frame), int(self.frame["user"].nunique()), int(self.frame["item"].nunique()))

    def stream(self, batch_rows: int = 1 << 20) -> EventStream:
        """The table as an ``EventStream`` (NaN ratings everywhere: implicit feedback, no rating column)."""
        frame = self.frame
        implicit = bool(np.isnan(frame["rating"].to_numpy()).all()) if len(frame) else False

        def ids(column: pd.Series) -> pa.Array:
            if column.dtype.kind in "iu":
                return pa.array(column.to_numpy(dtype=np.int64))
            return pa.array(column.astype(str).to_numpy(dtype=object), pa.string())

        def batches() -> Iterator[pa.RecordBatch]:
            for start in range(0, len(frame), batch_rows):
                part = frame.iloc[start : start + batch_rows]
                arrays = [ids(part["user"]), ids(part["item"]), pa.array(part["timestamp"].to_numpy(dtype=np.int64))]
                names = ["user", "item", "timestamp"]
                if not implicit:
                    arrays.append(pa.array(part["rating"].to_numpy(dtype=np.float64)))
                    names.append("rating")
                yield pa.RecordBatch.from_arrays(arrays, names=names)

        return EventStream(self.source, batches, self.titles, self.raw_item_kind)


@dataclass
class EventStream:
    """A source's events for the streaming preparation.

    ``open()`` yields Arrow record batches in source order with the columns user (int64 or string),
    item (likewise), timestamp (int64 seconds), rating (float64; absent for implicit feedback) and
    event_type (string; only when the source has one); each call reads the events again, the same
    rows each time (preparation reads them twice).

    Attributes:
        source: where it came from, for people (see ``Interactions.source``).
        titles: ``TITLE_COLUMNS`` table when the source ships item titles, else None.
        raw_item_kind: what the raw item ids are (``Interactions.raw_item_kind``).
        titles_are_ids: the raw item ids are the titles themselves (the RecBole copy of ML-1M).
        check_counts: called with the raw counts after the first read; raises when they are wrong.
    """

    source: str
    open: Callable[[], Iterator[pa.RecordBatch]]
    titles: pd.DataFrame | None = None
    raw_item_kind: str = "item"
    titles_are_ids: bool = False
    check_counts: Callable[[Counts], None] | None = None


class DatasetSource(ABC):
    """Somewhere interactions come from: a file, a download, a generator.

    ``prepare`` asks for the cheap ``fingerprint`` first, then the ``checksum``, and parses (``load``)
    only when neither matches the cache: a rerun with unchanged inputs parses nothing.
    """

    name: str
    """The cache folder's name under the datasets root, e.g. "ml-1m"."""

    @abstractmethod
    def fingerprint(self) -> str | None:
        """A cheap key (file sizes and mtimes, a config) that changes whenever the input may have;
        None when it cannot be known without work (e.g. nothing downloaded yet)."""

    @abstractmethod
    def checksum(self) -> str:
        """sha256 of the input; may download or hash files, but parses nothing."""

    @abstractmethod
    def load(self) -> Interactions:
        """Parses the whole input into memory (small data, tests)."""

    def events(self) -> EventStream:
        """The input as a stream (what preparation reads); by default ``load()``'s table."""
        return self.load().stream()

    def read_options(self) -> dict[str, object]:
        """How the input is read (format, column mapping, ...): recorded in the manifest, so a prepared
        dataset read another way is prepared again."""
        return {}


def sha256_files(paths: Iterable[Path], chunk_bytes: int = 1 << 20) -> str:
    """sha256 over the bytes of the files in order (a single file gives its usual sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def stat_fingerprint(paths: Iterable[Path]) -> str:
    """Path, size and mtime of each file: equal fingerprints mean the files were not touched."""
    parts = []
    for path in paths:
        st = os.stat(path)
        parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)

