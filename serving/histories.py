"""The known users' histories of an export, on disk and memory-mapped: a lookup is a binary search over
the sorted raw user ids, so the server holds no per-user Python object and its memory does not grow with
the number of users (the page cache holds what is read, shared by the processes of a machine).

Layout of ``<export>/histories/``::

    user_ids.npy     [U] the raw user ids, UTF-8, sorted (fixed-width bytes: numpy's searchsorted)
    offsets.npy      [U + 1] int64: user i's events are rows offsets[i]:offsets[i + 1]
    items.npy        [E] int32 dense item ids (the export's items table), oldest first
    timestamps.npy   [E] int64 seconds

Example::

    >>> import tempfile
    >>> h = UserHistories(np.array(["u2", "u1"]), np.array([0, 1, 3]), np.array([5, 6, 7]), np.array([10, 20, 30]))
    >>> store = HistoryStore.write(Path(tempfile.mkdtemp()) / "histories", h)
    >>> items, timestamps = store.get("u1")
    >>> len(store), items.tolist(), timestamps.tolist(), store.get("u9")
    (2, [6, 7], [20, 30], None)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class UserHistories:
    """Users' histories in memory, in any user order: what an export writes.

    Attributes:
        user_ids: [U] raw ids (str).
        offsets: [U + 1] int64; items, timestamps: [E] dense item ids and seconds, user by user, oldest first.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    def check(self, num_items: int) -> None:
        offsets = np.asarray(self.offsets)
        if offsets.shape != (len(self.user_ids) + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise ValueError(f"history offsets must be [users + 1] non-decreasing from 0; got {offsets.shape}")
        if len(self.items) != offsets[-1] or len(self.timestamps) != offsets[-1]:
            raise ValueError(f"histories: {offsets[-1]} events by the offsets, {len(self.items)} items and "
                             f"{len(self.timestamps)} timestamps")
        if len(self.items) and (np.min(self.items) < 1 or np.max(self.items) > num_items):
            raise ValueError(f"history item ids must be dense ids 1..{num_items}")


class HistoryStore:
    """The export's histories, memory-mapped (``write`` or ``open``); ``get`` looks one user up."""

    def __init__(self, user_ids: np.ndarray, offsets: np.ndarray, items: np.ndarray, timestamps: np.ndarray):
        self.user_ids, self.offsets, self.items, self.timestamps = user_ids, offsets, items, timestamps

    @staticmethod
    def empty() -> HistoryStore:
        return HistoryStore(np.zeros(0, dtype="S1"), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32),
                            np.zeros(0, dtype=np.int64))

    @staticmethod
    def write(directory: Path | str, histories: UserHistories) -> HistoryStore:
        """Writes ``histories`` sorted by raw user id (vectorised: no per-user Python work) and opens them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        encoded = np.char.encode(np.asarray(histories.user_ids, dtype=str), "utf-8")
        if encoded.size and (encoded == b"").any():
            raise ValueError("a user id is empty")
        order = np.argsort(encoded, kind="stable")
        ids = encoded[order]
        if ids.size > 1 and (ids[1:] == ids[:-1]).any():
            raise ValueError(f"user id {ids[1:][ids[1:] == ids[:-1]][0].decode()!r} appears twice")
        offsets = np.asarray(histories.offsets, dtype=np.int64)
        lengths = np.diff(offsets)[order]
        new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Row r of the new layout comes from row r - new_start + old_start of its user.
        rows = np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
        np.save(directory / "user_ids.npy", ids)
        np.save(directory / "offsets.npy", new_offsets)
        np.save(directory / "items.npy", np.asarray(histories.items)[rows].astype(np.int32))
        np.save(directory / "timestamps.npy", np.asarray(histories.timestamps)[rows].astype(np.int64))
        return HistoryStore.open(directory)

    @staticmethod
    def open(directory: Path | str) -> HistoryStore:
        directory = Path(directory)
        arrays = [np.load(directory / f"{name}.npy", mmap_mode="r")
                  for name in ("user_ids", "offsets", "items", "timestamps")]
        if len(arrays[1]) != len(arrays[0]) + 1 or len(arrays[2]) != arrays[1][-1] != len(arrays[3]):
            raise ValueError(f"{directory}: the history arrays do not agree; export again")
        return HistoryStore(*arrays)

    def __len__(self) -> int:
        return len(self.user_ids)

    def get(self, raw_user: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(dense item ids, timestamps) of a known user, oldest first (read-only views); None if unknown."""
        key = raw_user.encode("utf-8")
        if not key or len(key) > self.user_ids.dtype.itemsize:
            return None
        row = int(np.searchsorted(self.user_ids, key))
        if row == len(self.user_ids) or self.user_ids[row] != key:
            return None
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.items[start:end], self.timestamps[start:end]

    def to_histories(self) -> UserHistories:
        """Everything in memory again (to write another export from this one)."""
        return UserHistories(np.char.decode(np.asarray(self.user_ids), "utf-8"), np.asarray(self.offsets),
                             np.asarray(self.items), np.asarray(self.timestamps))
