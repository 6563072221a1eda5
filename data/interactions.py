"""The interactions table every loader returns, and the contract a dataset source fulfils.

An ``Interactions`` is one in-memory pandas table, one row per event in the order the source wrote
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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

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
        """Parses the input."""


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

