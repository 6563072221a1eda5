"""Raw ↔ dense ids, item titles and the known users' histories of an export, as lookups.

The wire speaks raw ids ("1193"); the model speaks dense rows (1..num_items, 0 padding). The export's
histories stay on disk, memory-mapped (``serving.histories``): no per-user object in the process.

Example::

    >>> cat = Catalogue.from_artifact(load_artifact("runs/latest/export"))
    >>> cat.dense_id("1193"), cat.raw_ids[cat.dense_id("1193")]
    (42, '1193')
    >>> cat.user_history("1").items[:3]
    array([ 12, 977, 1043])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data.splits import SeenItems
from serving.appended import AppendedEvents
from serving.artifact import Artifact
from serving.histories import HistoryStore


@dataclass(frozen=True)
class History:
    """One user's events, oldest first: dense item ids and timestamps (seconds), both int64."""

    items: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


class Catalogue:
    """Lookups built once from the export's items and users tables."""

    def __init__(self, items: pd.DataFrame, histories: HistoryStore | None = None,
                 appended: AppendedEvents | None = None, exclude_seen: SeenItems = SeenItems.HISTORY):
        self.exclude_seen = SeenItems(exclude_seen)
        """The export's rule of what a user has seen (``Artifact.exclude_seen``)."""
        items = items.sort_values("item_id")
        self.num_items = len(items)
        # Index 0 is the padding row: it has no raw id and is never returned.
        self.raw_ids: list[str] = ["", *items["raw_item"].astype(str)]
        titles = items["title"] if "title" in items.columns else pd.Series([None] * self.num_items)
        self.titles: list[str] = ["", *("" if pd.isna(t) else str(t) for t in titles)]
        self._dense = {raw: i for i, raw in enumerate(self.raw_ids) if i > 0}
        # Arrow copies for ``search``: its substring scan runs in C++, without the GIL.
        self._searchable = (pa.array(self.raw_ids[1:], pa.string()), pa.array(self.titles[1:], pa.string()))
        self.histories = histories if histories is not None else HistoryStore.empty()
        self.appended = appended or AppendedEvents(":memory:")
        """AppendEvents' events (``serving.appended``): the server's live in a file beside the export."""

    @classmethod
    def from_artifact(cls, artifact: Artifact, appended: AppendedEvents | None = None) -> Catalogue:
        return cls(artifact.items, artifact.histories, appended, artifact.exclude_seen)

    @property
    def num_users(self) -> int:
        return len(self.histories)

    def dense_id(self, raw_item: str) -> int:
        """The dense row of a raw item id, 0 when unknown."""
        return self._dense.get(raw_item, 0)

    def dense_ids(self, raw_items: list[str]) -> np.ndarray:
        """[n] int64 dense rows, 0 for each unknown id."""
        get = self._dense.get
        return np.fromiter((get(x, 0) for x in raw_items), dtype=np.int64, count=len(raw_items))

    def search(self, text: str, limit: int) -> tuple[list[int], int]:
        """Dense ids of the items whose raw id or title contains ``text``, ignoring case, and how many
        match in all. The item whose raw id is ``text`` comes first (numeric ids: "1" before "1193"),
        the others in catalogue order; at most ``limit``. One scan of the catalogue, ~0.2 s a million
        items."""
        ids, titles = self._searchable
        hits = pc.or_(pc.match_substring(ids, text, ignore_case=True),
                      pc.match_substring(titles, text, ignore_case=True))
        dense = np.flatnonzero(hits.to_numpy(zero_copy_only=False)) + 1
        exact = self.dense_id(text)
        if exact:
            dense = np.concatenate([[exact], dense[dense != exact]])
        return dense[:limit].tolist(), len(dense)

    def user_history(self, raw_user: str) -> History | None:
        """The history of a known user (the export's, then appended events), None for an unknown one."""
        found = self.histories.get(raw_user)
        appended = self._appended_history(raw_user)
        if found is None:
            return appended
        stored = History(found[0].astype(np.int64), found[1].astype(np.int64))
        if appended is None:
            return stored
        return History(np.concatenate([stored.items, appended.items]),
                       np.concatenate([stored.timestamps, appended.timestamps]))

    def append_events(self, raw_user: str, items: np.ndarray, timestamps: np.ndarray) -> int:
        """Adds validated events (dense ids, seconds; oldest first, not older than the user's last) to a
        user's history and returns its new length. Within ``appended.limits``: the user's most recent
        ``max_events`` appended events are kept (older ones drop out of the history, and so out of the
        excluded items), and the least recently used users beyond ``max_users`` lose theirs (a user
        the export knows falls back to its stored history, another becomes unknown). Written through
        to ``appended``'s file before this returns: a restart loses none of them."""
        self.appended.add(raw_user, [self.raw_ids[i] for i in items.tolist()], timestamps)
        history = self.user_history(raw_user)
        return 0 if history is None else len(history)

    def _appended_history(self, raw_user: str) -> History | None:
        found = self.appended.get(raw_user)
        if found is None:
            return None
        raw, stamps = found
        dense = self.dense_ids(raw)
        known = dense > 0  # an id that a later export dropped
        return History(dense[known], stamps[known])
