"""manifest.json: what a prepared dataset was made from, how, and what was left out."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from data.interactions import Counts
from data.sequences import Dropped

FORMAT_VERSION = 3
"""Bump when preprocessing or the files change meaning: older caches are then rebuilt, not reused."""


@dataclass(frozen=True)
class Manifest:
    """Written last, so a folder with a manifest of the current version holds a complete dataset.

    Attributes:
        name: the dataset's folder name, e.g. "ml-1m".
        source: where the interactions came from (see ``Interactions.source``).
        raw_item_kind: what ``items.raw_item`` holds, e.g. "movieId" or "title".
        checksum: sha256 of the input (the cache key).
        fingerprint: sizes and mtimes of the inputs when prepared (a fast cache check).
        raw_counts: the interactions table as read.
        counts: what the sequences hold after the drops.
        dropped: what preprocessing left out, and why.
        options: how the input was read and filtered (format, column mapping, k-core, event types):
            a dataset asked for with other options is prepared again.
        has_ratings: False for implicit feedback (no ratings file).
    """

    name: str
    source: str
    raw_item_kind: str
    checksum: str
    fingerprint: str | None
    raw_counts: Counts
    counts: Counts
    dropped: Dropped
    options: dict = field(default_factory=dict)
    has_ratings: bool = True
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["raw_counts"], d["counts"] = self.raw_counts._asdict(), self.counts._asdict()
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["raw_counts"], d["counts"] = Counts(**d["raw_counts"]), Counts(**d["counts"])
        d["dropped"] = Dropped(**d["dropped"])
        return cls(**d)

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``; None when it is missing or from another format version."""
        try:
            text = Path(path).read_text()
            if json.loads(text).get("format_version") != FORMAT_VERSION:
                return None
            return cls.from_json(text)
        except (FileNotFoundError, json.JSONDecodeError, TypeError, KeyError):
            return None
