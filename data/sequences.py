"""Per-user chronological sequences over dense ids: the preprocessing rules, and the packed arrays.

The rules (what training and evaluation rely on; ``data.streaming`` applies them):
- exact duplicate rows (same user, item, timestamp, rating and event type) are dropped, the first
  one kept;
- the k-core filter: users with fewer than ``min_user_events`` events and items with fewer than
  ``min_item_events`` are dropped, again and again until no user or item falls short (dropping a user
  can leave an item short, and the other way round). The defaults (2, 1) drop the users that no split
  can use (the test split alone needs one history item and a target), and nothing else;
- each user's events are sorted by timestamp, ties kept in source file order;
- items get dense ids 1..num_items (0 is padding) and users a dense index 0..num_users-1, both in
  ascending order of the raw ids (numeric for integer ids, by code point for strings), so the
  mapping does not depend on row order.
Everything dropped is counted, logged and recorded in the manifest.

Example::

    >>> frame = pd.DataFrame({"user": [7, 7, 7, 9], "item": [30, 10, 20, 10],
    ...                       "timestamp": [5, 5, 1, 3], "rating": [1.0, 1.0, 1.0, 1.0]})
    >>> from data.prepare import PreparedDataset
    >>> ds = PreparedDataset.from_interactions(Interactions(frame, source="example", path=None, checksum=""), "ex")
    >>> ds.packed[0][0].tolist(), ds.manifest.dropped.short_users   # item 20 (t=1), then 30, 10 tied at t=5
    ([2, 3, 1], 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd  # noqa: F401 (the doctest)

from data.interactions import Interactions  # noqa: F401 (the doctest)

MIN_EVENTS = 2
"""The default ``min_user_events``: the test split alone needs one history item and a target."""


@dataclass(frozen=True)
class UserSequences:
    """Every user's items in time order, CSR-style: user u's events are rows ``offsets[u]:offsets[u+1]``.

    The arrays may be memory-mapped files (a prepared dataset on disk): index them, do not copy them.

    Attributes:
        offsets: [U+1] int64, starting at 0.
        items: [N] int32 or int64 dense item ids (1..num_items).
        timestamps: [N] int64 seconds, non-decreasing within each user.
        ratings: [N] float32, the rating (explicit feedback) of each event; NaN when unknown (implicit
            feedback: then a read-only broadcast of one NaN, no memory per event).
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets.size == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-D and start at 0")
        n = int(self.offsets[-1])
        if self.items.shape != (n,) or self.timestamps.shape != (n,) or self.ratings.shape != (n,):
            raise ValueError(
                f"offsets end at {n}, items have shape {self.items.shape}, timestamps {self.timestamps.shape}, "
                f"ratings {self.ratings.shape}"
            )

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, timestamps) of one user, oldest first."""
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return self.items[lo:hi], self.timestamps[lo:hi]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class Dropped:
    """What preprocessing left out, so nothing disappears silently."""

    duplicate_rows: int
    short_users: int
    """Users dropped by the k-core filter (fewer than ``min_user_events`` events, at some round)."""
    short_user_events: int
    """The events dropped with them (those an item rule had not dropped before)."""
    short_items: int = 0
    """Items that occurred but are gone: cut by the item rule, or left without events by the user rule."""
    short_item_events: int = 0
    """Events dropped by the item rule (fewer than ``min_item_events`` events) whose user stayed."""
    other_event_types: int = 0
    """Events of a type the preparation was told not to keep."""
    kcore_rounds: int = 0
    """Rounds the k-core filter took to reach its fixed point (0: nothing to drop)."""
