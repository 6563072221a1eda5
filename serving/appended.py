"""The events AppendEvents adds, in an SQLite file, so that a restart (or a replica reading the same
file) loses none of them.

One row per user: the raw item ids (JSON), the timestamps (int64 bytes) and when the user was last
used (a counter, for the least-recently-used bound). Raw ids rather than the export's dense rows, so a
server restarted on a new export of the same catalogue reads them right; an id the new export lacks
is dropped when read. SQLite's write-ahead log lets several server processes on one machine share the
file (each write is one short transaction); across machines, route a user to one replica, which also
keeps that user's KV cache warm there.

Example::

    >>> store = AppendedEvents(":memory:", AppendLimits(max_users=2, max_events=3))
    >>> store.add("u1", ["a", "b"], np.array([10, 20]))
    (['a', 'b'], array([10, 20]))
    >>> store.add("u1", ["c", "d"], np.array([30, 40]))[0]        # the most recent 3
    ['b', 'c', 'd']
    >>> store.get("nobody") is None
    True
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class AppendLimits:
    """Bounds on the events that AppendEvents keeps: any caller can write them, so without bounds they
    grow until the disk is full. At most ``max_users`` x ``max_events`` events are kept.

    Attributes:
        max_users: users whose appended events are kept; past it the least recently used user (by
            an append or a read of its history) loses them.
        max_events: appended events kept per user, the most recent (the model sees at most its
            max_seq_len latest events; older ones only keep their items out of recommendations).
    """

    max_users: int = 10_000
    max_events: int = 1_000

    def __post_init__(self) -> None:
        if self.max_users < 1 or self.max_events < 1:
            raise ValueError(f"invalid append limits {self}")


class AppendedEvents:
    """Appended events per raw user id, oldest first, in the SQLite file ``path`` (":memory:" keeps
    them in this process only). Safe to call from several threads."""

    def __init__(self, path: str | Path, limits: AppendLimits | None = None) -> None:
        self.limits = limits or AppendLimits()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.execute("CREATE TABLE IF NOT EXISTS appended (user TEXT PRIMARY KEY, items TEXT NOT NULL, "
                             "timestamps BLOB NOT NULL, used INTEGER NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS appended_used ON appended (used)")
            (last,) = self._db.execute("SELECT coalesce(max(used), 0) FROM appended").fetchone()
            self._clock = int(last)

    def get(self, user: str) -> tuple[list[str], np.ndarray] | None:
        """(raw item ids, timestamps) appended for ``user``, oldest first, or None; counts as a use."""
        with self._lock:
            row = self._db.execute("SELECT items, timestamps FROM appended WHERE user = ?", (user,)).fetchone()
            if row is None:
                return None
            self._clock += 1
            self._db.execute("UPDATE appended SET used = ? WHERE user = ?", (self._clock, user))
        return json.loads(row[0]), np.frombuffer(row[1], dtype=np.int64).copy()

    def add(self, user: str, items: list[str], timestamps: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Appends events (oldest first) and returns what is kept for ``user``: its most recent
        ``max_events``. The least recently used users beyond ``max_users`` lose theirs."""
        keep = self.limits.max_events
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT items, timestamps FROM appended WHERE user = ?", (user,)).fetchone()
                old_items, old_stamps = ([], np.zeros(0, np.int64)) if row is None else (
                    json.loads(row[0]), np.frombuffer(row[1], dtype=np.int64))
                kept_items = (old_items + list(items))[-keep:]
                kept_stamps = np.concatenate([old_stamps, np.asarray(timestamps, dtype=np.int64)])[-keep:]
                self._clock += 1
                self._db.execute("INSERT OR REPLACE INTO appended VALUES (?, ?, ?, ?)",
                                 (user, json.dumps(kept_items), kept_stamps.tobytes(), self._clock))
                self._db.execute("DELETE FROM appended WHERE user IN (SELECT user FROM appended ORDER BY used DESC "
                                 "LIMIT -1 OFFSET ?)", (self.limits.max_users,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return kept_items, kept_stamps.copy()

    def close(self) -> None:
        with self._lock:
            self._db.close()
