"""Per-user KV cache: each HSTU block's keys and values of the history already computed, LRU under a
byte budget.

Only the model thread touches it (the engine's ``Prefill`` work items), so it needs no lock. An
entry is reused when its items and timestamps are a prefix of the request's history window; anything
else (an edited history, or a window that slid because the history outgrew ``max_seq_len``) is a
miss and is recomputed.

Example::

    >>> cache = KVCache(budget_bytes=64 << 20)
    >>> cache.lookup("42", items, timestamps)      # None: a miss
    >>> cache.put("42", state)
    >>> cache.lookup("42", items_plus_new, timestamps_plus_new) is state   # a hit: extend it
    True
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from models.incremental import PrefixState
from serving.metrics import Metrics


class KVCache:
    """LRU map user key -> ``PrefixState``, holding at most ``budget_bytes`` of tensors."""

    def __init__(self, budget_bytes: int, metrics: Metrics | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self._entries: OrderedDict[str, tuple[PrefixState, np.ndarray, np.ndarray]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, items: np.ndarray, timestamps: np.ndarray) -> PrefixState | None:
        """The cached state of ``key`` if it is a prefix of (items, timestamps), else None."""
        entry = self._entries.get(key)
        usable = (
            entry is not None
            and len(entry[1]) <= len(items)
            and np.array_equal(entry[1], items[: len(entry[1])])
            and np.array_equal(entry[2], timestamps[: len(entry[2])])
        )
        if usable:
            self._entries.move_to_end(key)
            self.hits += 1
            self._count("hits")
            return entry[0]
        self.misses += 1
        self._count("misses")
        return None

    def put(self, key: str, state: PrefixState, items: np.ndarray | None = None,
            timestamps: np.ndarray | None = None) -> None:
        """Stores ``state`` for ``key`` (replacing the old one), then evicts least recently used entries
        until the budget holds. A state larger than the whole budget is not stored.

        ``items`` and ``timestamps``: the state's events on the host, when the caller has them (the
        request's); else they are copied from the device, a synchronising copy each on a GPU."""
        self.drop(key)
        size = state.nbytes
        if size > self.budget_bytes:
            return
        # Copies, not views: a view would keep the request's whole history alive as long as the entry.
        items = state.items.cpu().numpy() if items is None else np.array(items[: state.length])
        stamps = state.timestamps.cpu().numpy() if timestamps is None else np.array(timestamps[: state.length])
        self._entries[key] = (state, items, stamps)
        self.bytes += size
        while self.bytes > self.budget_bytes:
            _, (old, _, _) = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
            self._count("evictions")
        self._observe_bytes()

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0].nbytes
            self._observe_bytes()

    def _count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.kv_cache_events.labels(event=event).inc()

    def _observe_bytes(self) -> None:
        if self.metrics is not None:
            self.metrics.kv_cache_bytes.set(self.bytes)
