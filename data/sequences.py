"""From an interactions table to per-user chronological sequences over dense ids.

The rules (what training and evaluation rely on):
- exact duplicate rows (same user, item, timestamp and rating) are dropped, the first one kept;
- users with fewer than ``MIN_EVENTS`` events are dropped (no split can use them);
- each user's events are sorted by timestamp, ties kept in source file order;
- items get dense ids 1..num_items (0 is padding) and users a dense index 0..num_users-1, both in
  ascending order of the raw ids, so the mapping does not depend on row order.
Everything dropped is counted, logged and recorded in the manifest.

Example::

    >>> frame = pd.DataFrame({"user": [7, 7, 7, 9], "item": [30, 10, 20, 10],
    ...                       "timestamp": [5, 5, 1, 3], "rating": [1.0, 1.0, 1.0, 1.0]})
    >>> built = index_interactions(Interactions(frame, source="example", path=None, checksum=""))
    >>> built.sequences[0][0].tolist(), built.dropped.short_users   # item 20 (t=1), then 30, 10 tied at t=5
    ([2, 3, 1], 1)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from data.interactions import Interactions

log = logging.getLogger(__name__)

MIN_EVENTS = 2
"""Users with fewer events are dropped: the test split alone needs one history item and a target."""


@dataclass(frozen=True)
class UserSequences:
    """Every user's items in time order, CSR-style: user u's events are rows ``offsets[u]:offsets[u+1]``.

    Attributes:
        offsets: [U+1] int64, starting at 0.
        items: [N] int64 dense item ids (1..num_items).
        timestamps: [N] int64 seconds, non-decreasing within each user.
        ratings: [N] float32, the rating (explicit feedback) of each event.
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
    """Users with fewer than ``MIN_EVENTS`` events (after dropping duplicates)."""
    short_user_events: int
    """The events of those users."""


class Indexed(NamedTuple):
    sequences: UserSequences
    raw_users: pd.Series
    """The raw id of each dense user index."""
    items: pd.DataFrame
    """(item_id int64 dense id from 1, raw_item, title str or missing)."""
    dropped: Dropped


def index_interactions(interactions: Interactions) -> Indexed:
    """Applies the module's rules; fails when nothing usable is left."""
    frame = interactions.frame
    if len(frame) == 0:
        raise ValueError(f"{interactions.source}: the dataset is empty")

    duplicate = frame.duplicated(keep="first").to_numpy()
    frame = frame[~duplicate]
    user_codes, _ = pd.factorize(frame["user"], sort=True)
    per_user = np.bincount(user_codes)
    short = per_user < MIN_EVENTS
    keep = ~short[user_codes]
    dropped = Dropped(
        duplicate_rows=int(duplicate.sum()),
        short_users=int(short.sum()),
        short_user_events=int(per_user[short].sum()),
    )
    if dropped.duplicate_rows:
        log.warning("%s: dropped %d exact duplicate rows", interactions.source, dropped.duplicate_rows)
    if dropped.short_users:
        log.warning(
            "%s: dropped %d users with fewer than %d events (%d events)",
            interactions.source, dropped.short_users, MIN_EVENTS, dropped.short_user_events,
        )
    if not keep.any():
        raise ValueError(f"{interactions.source}: no user has {MIN_EVENTS} or more interactions")
    frame = frame[keep]

    user_codes, raw_users = pd.factorize(frame["user"], sort=True)
    item_codes, raw_items = pd.factorize(frame["item"], sort=True)
    timestamps = frame["timestamp"].to_numpy(dtype=np.int64)
    # The file position is an explicit last key, so ties keep file order whatever sort lexsort uses.
    order = np.lexsort((np.arange(len(frame)), timestamps, user_codes))
    offsets = np.zeros(len(raw_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_codes, minlength=len(raw_users)), out=offsets[1:])
    sequences = UserSequences(
        offsets=offsets,
        items=item_codes[order].astype(np.int64) + 1,
        timestamps=timestamps[order],
        ratings=frame["rating"].to_numpy(dtype=np.float32)[order],
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, len(raw_items) + 1, dtype=np.int64),
            "raw_item": raw_items,
            "title": _titles_for(raw_items, interactions.titles),
        }
    )
    return Indexed(sequences, pd.Series(raw_users, name="raw_user"), items, dropped)


def _titles_for(raw_items: pd.Index, titles: pd.DataFrame | None) -> pd.Series:
    if titles is None:
        return pd.Series(pd.NA, index=range(len(raw_items)), dtype="str")
    by_item = titles.drop_duplicates("item").set_index("item")["title"]
    return pd.Series(by_item.reindex(raw_items).to_numpy(), dtype="str")
