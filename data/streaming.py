"""The streaming preparation: an ``EventStream`` in, the packed arrays of ``data.prepare`` out.

Memory is bounded by ``partition_events`` (the events sorted at once), plus arrays of one entry per
distinct user and per distinct item (their raw ids, counts and new ids); nothing holds all the events,
and nothing grows with users x items. Disk: about 30 bytes per event of scratch space in ``work``.

Passes (numpy and pyarrow only):

1. read the events once: the distinct raw user and item ids (sorted: they become the dense ids), the
   event types, and the counts.
2. read them again: each raw id becomes its rank among the sorted ids (its code), and each event goes
   to the spill file of its user's partition: partitions are contiguous ranges of user codes sized so
   that each holds about ``partition_events`` events (file order is kept inside a partition).
3. each partition alone: a stable sort by (user, timestamp), so ties stay in file order; exact
   duplicates dropped (only events tied on (user, timestamp) can be duplicates); events counted per
   user and per item.
4. the k-core filter to its fixed point: each round reads the users' and items' codes of every
   partition, counts the events whose user and item are both still in, and drops the users and
   items that fall short; until a round drops nothing.
5. the output, partition after partition, in order: a user's dense index is its code's rank among
   the users kept (so partitions, in order, are already sorted by dense user), an item's id likewise.

Files written to ``out`` (``data.prepare`` documents them): ``offsets.npy``, ``items.npy`` (int32),
``timestamps.npy``, ``ratings.npy`` (explicit feedback only), ``users.parquet``, ``items.parquet``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.interactions import Counts, EventStream
from data.manifest import Manifest
from data.sequences import Dropped

log = logging.getLogger(__name__)

PARTITION_EVENTS = 8_000_000
"""Events sorted at once (about 30 bytes each, a few copies during the sort: ~1 GiB at this size)."""

OFFSETS_FILE = "offsets.npy"
ITEMS_FILE = "items.npy"
TIMESTAMPS_FILE = "timestamps.npy"
RATINGS_FILE = "ratings.npy"
USERS_TABLE = "users.parquet"
ITEMS_TABLE = "items.parquet"


@dataclass(frozen=True)
class KCore:
    min_user_events: int = 2
    min_item_events: int = 1

    def __post_init__(self) -> None:
        if self.min_user_events < 1 or self.min_item_events < 1:
            raise ValueError(f"min_user_events and min_item_events must be >= 1, got {self}")


@dataclass(frozen=True)
class Built:
    raw_counts: Counts
    """The events as read (after the event-type filter), their distinct users and items."""
    counts: Counts
    dropped: Dropped
    has_ratings: bool

    def manifest(self, name: str, stream: EventStream, checksum: str, fingerprint: str | None,
                 options: dict) -> Manifest:
        """The manifest of this build of ``stream``'s events, read and filtered as ``options`` say."""
        return Manifest(name=name, source=stream.source, raw_item_kind=stream.raw_item_kind, checksum=checksum,
                        fingerprint=fingerprint, raw_counts=self.raw_counts, counts=self.counts,
                        dropped=self.dropped, options=options, has_ratings=self.has_ratings)


class EmptyDatasetError(ValueError):
    """Nothing is left to train on (empty input, or everything filtered out)."""


# --- raw ids -> codes ---------------------------------------------------------------------------
class _Ids:
    """The distinct raw ids of one column (int64 or string), collected batch by batch; then each raw
    id's code, its rank among them.

    Integer ids within a range of ``MAX_DENSE_RANGE`` (MovieLens-like 1..n) are marked in a table of
    one byte per id of the range; others are merged as sorted arrays (np.unique), strings as Arrow
    arrays (hash-based unique, then one sort). Memory: one entry per distinct id (or per id of the range).
    """

    MAX_DENSE_RANGE = 1 << 28

    def __init__(self, what: str) -> None:
        self.what = what
        self.strings: bool | None = None
        self._parts: list = []
        self._pending = 0
        self._sorted_ints = np.zeros(0, dtype=np.int64)
        self._sorted_strings: pa.Array | None = None
        self._present: np.ndarray | None = np.zeros(0, dtype=bool)  # None once the range is too wide
        self._base = 0
        self._lut: np.ndarray | None = None

    def _kind(self, column: pa.Array) -> None:
        strings = not pa.types.is_integer(column.type)
        if self.strings is None:
            self.strings = strings
        elif self.strings != strings:
            raise TypeError(f"{self.what} ids change type mid-stream ({column.type})")

    def add(self, column: pa.Array) -> None:
        self._kind(column)
        if self.strings:
            unique = pc.unique(column).cast(pa.large_string())
        else:
            values = column.to_numpy()
            if self._present is not None and self._mark(values):
                return
            unique = np.unique(values)
        self._parts.append(unique)
        self._pending += len(unique)
        if self._pending > max(2 * self._size(), 1 << 22):
            self._compact()

    def _mark(self, values: np.ndarray) -> bool:
        """Marks the ids in the dense table; False (and no table from now on) when the range is too wide."""
        assert self._present is not None
        if len(values) == 0:
            return True
        lo, hi = int(values.min()), int(values.max())
        if len(self._present):
            lo, hi = min(lo, self._base), max(hi, self._base + len(self._present) - 1)
        if hi - lo + 1 > self.MAX_DENSE_RANGE:
            self._parts.append(np.flatnonzero(self._present) + self._base)
            self._pending += len(self._parts[-1])
            self._present = None
            return False
        if not len(self._present) or lo < self._base or hi >= self._base + len(self._present):
            grown = np.zeros(hi - lo + 1, dtype=bool)
            grown[self._base - lo : self._base - lo + len(self._present)] = self._present
            self._present, self._base = grown, lo
        self._present[values - self._base] = True
        return True

    def _size(self) -> int:
        return len(self._sorted_ints) if not self.strings else len(self._sorted_strings or [])

    def _compact(self) -> None:
        if self.strings:
            merged = pa.chunked_array([*([self._sorted_strings] if self._sorted_strings is not None else []),
                                       *self._parts], pa.large_string())
            unique = pc.unique(merged) if merged.num_chunks else pa.array([], pa.large_string())
            self._sorted_strings = unique.combine_chunks() if isinstance(unique, pa.ChunkedArray) else unique
        elif self._parts:
            self._sorted_ints = np.unique(np.concatenate([self._sorted_ints, *self._parts]))
        self._parts, self._pending = [], 0

    def finish(self) -> int:
        """Sorts the ids; returns how many there are."""
        if self.strings:
            self._compact()
            ids = self._sorted_strings if self._sorted_strings is not None else pa.array([], pa.large_string())
            # Arrow orders strings by their UTF-8 bytes: code-point order, as Python's sort.
            self._sorted_strings = ids.take(pc.sort_indices(ids))
            return len(self._sorted_strings)
        if self._present is not None:
            self._sorted_ints = np.flatnonzero(self._present) + self._base
            # A lookup table when the ids are dense enough: one gather per event.
            if len(self._present) <= 4 * len(self._sorted_ints) + (1 << 20):
                self._lut = np.cumsum(self._present, dtype=np.int64) - 1
            self._present = None
        else:
            self._compact()
        return len(self._sorted_ints)

    def codes(self, column: pa.Array) -> np.ndarray:
        """[n] int64 code of each raw id (every id was ``add``-ed before)."""
        self._kind(column)
        if self.strings:
            assert self._sorted_strings is not None
            encoded = pc.dictionary_encode(column.cast(pa.large_string()))
            positions = pc.search_sorted(self._sorted_strings, encoded.dictionary).to_numpy().astype(np.int64)
            return positions[encoded.indices.to_numpy(zero_copy_only=False)]
        values = column.to_numpy()
        if self._lut is not None:
            return self._lut[values - self._base]
        # Sorted queries walk the table in order: much faster than random ones on a large table.
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values), dtype=np.int64)
        out[order] = np.searchsorted(self._sorted_ints, values[order])
        return out

    def raw(self, keep: np.ndarray) -> pa.Array:
        """The raw ids whose ``keep`` is True, in code order."""
        if self.strings:
            assert self._sorted_strings is not None
            return self._sorted_strings.filter(pa.array(keep)).cast(pa.string())
        return pa.array(self._sorted_ints[keep])


# --- spill files ----------------------------------------------------------------------------------
_SPILL = (("user", np.int32), ("item", np.int32), ("timestamp", np.int64), ("rating", np.float64),
          ("event_type", np.uint16))
_CLEAN = (("user", np.int32), ("item", np.int32), ("timestamp", np.int64), ("rating", np.float32))


def _append(path: Path, values: np.ndarray) -> None:
    with open(path, "ab") as f:
        values.tofile(f)


def _read(path: Path, dtype: type) -> np.ndarray:
    return np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype=dtype)


class _NpyWriter:
    """A 1-D .npy file of known length, written front to back (no memory map, so no resident pages)."""

    def __init__(self, path: Path, dtype: type, length: int) -> None:
        self.path, self.dtype, self.length, self.written = path, np.dtype(dtype), length, 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close(), after many writes)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.written += len(values)

    def close(self) -> None:
        self.file.close()
        if self.written != self.length:
            raise RuntimeError(f"{self.path}: wrote {self.written} values, expected {self.length}")


# --- the build --------------------------------------------------------------------------------------
def build(
    stream: EventStream,
    out: Path,
    *,
    work: Path,
    kcore: KCore = KCore(),
    event_types: tuple[str, ...] = (),
    partition_events: int = PARTITION_EVENTS,
) -> Built:
    """Writes the prepared arrays of ``stream`` into ``out`` (module docstring), using ``work`` for
    scratch files (removed on return). Raises ``EmptyDatasetError`` when nothing is left."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _Build(stream, out, work, kcore, event_types, max(1, partition_events)).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Build:
    def __init__(self, stream: EventStream, out: Path, work: Path, kcore: KCore, event_types: tuple[str, ...],
                 partition_events: int) -> None:
        self.stream, self.out, self.work, self.kcore = stream, out, work, kcore
        self.keep_types = pa.array(sorted(set(event_types)), pa.string()) if event_types else None
        self.partition_events = partition_events
        self.users, self.items = _Ids("user"), _Ids("item")
        self.type_names: list[str] = []
        self.has_ratings: bool | None = None
        self.has_types = False

    # pass 1 and 2 read the same batches, filtered the same way
    def _batches(self) -> Iterator[tuple[pa.RecordBatch, int]]:
        for batch in self.stream.open():
            has_ratings = "rating" in batch.schema.names
            if self.has_ratings is None:
                self.has_ratings, self.has_types = has_ratings, "event_type" in batch.schema.names
            elif has_ratings != self.has_ratings:
                raise TypeError(f"{self.stream.source}: some batches have ratings and some do not")
            if self.keep_types is not None:
                if not self.has_types:
                    raise ValueError(f"{self.stream.source}: event types to keep were given, but the events have "
                                     "no event-type column (map it: data.columns.event_type)")
                keep = pc.is_in(batch.column("event_type"), value_set=self.keep_types)
                filtered = batch.num_rows - pc.sum(keep).as_py() if batch.num_rows else 0
                batch = batch.filter(keep)
            else:
                filtered = 0
            yield batch, filtered

    def run(self) -> Built:
        name = self.stream.source
        clock = _Clock(name)
        # --- pass 1: the distinct ids ---
        rows = filtered = 0
        types: set[str] = set()
        for batch, dropped_types in self._batches():
            filtered += dropped_types
            if batch.num_rows == 0:
                continue
            self.users.add(batch.column("user"))
            self.items.add(batch.column("item"))
            if self.has_types:
                types.update(pc.unique(batch.column("event_type")).to_pylist())
            rows += batch.num_rows
        if rows == 0:
            raise EmptyDatasetError(f"{name}: the dataset is empty" + (
                f" (no event of the types {self.keep_types.to_pylist()})" if self.keep_types is not None else ""))
        num_users, num_items = self.users.finish(), self.items.finish()
        self.type_names = sorted(types)
        if len(self.type_names) > np.iinfo(np.uint16).max:
            raise ValueError(f"{name}: more than 65535 event types")
        raw_counts = Counts(rows, num_users, num_items)
        if self.stream.check_counts is not None:
            self.stream.check_counts(raw_counts)
        clock.lap("read {} events, {} users, {} items".format(*raw_counts))

        # --- pass 2: codes, spilled by user range ---
        parts = max(1, math.ceil(rows / self.partition_events))
        spilled = self._spill(parts, num_users)
        if spilled != rows:
            raise RuntimeError(f"{name}: read {rows} events, then {spilled}: the input changed while it was "
                               "being prepared")
        clock.lap(f"spilled to {parts} partition(s) by user")

        # --- pass 3: sort, drop duplicates, count ---
        user_counts = np.zeros(num_users, dtype=np.int64)
        item_counts = np.zeros(num_items, dtype=np.int64)
        duplicates = 0
        for p in range(parts):
            duplicates += self._sort_partition(p, parts, num_users, user_counts, item_counts)
        if duplicates:
            log.warning("%s: dropped %d exact duplicate rows", name, duplicates)
        clock.lap("sorted by (user, time)")

        # --- pass 4: the k-core filter ---
        keep_user, keep_item, dropped = self._kcore(parts, user_counts, item_counts, duplicates, filtered)
        if not keep_user.any():
            raise EmptyDatasetError(f"{name}: no user has {self.kcore.min_user_events} or more interactions"
                                    + ("" if self.kcore.min_item_events <= 1 else
                                       f" on items with {self.kcore.min_item_events} or more"))

        clock.lap(f"k-core filter: {dropped.kcore_rounds} round(s)")
        # --- pass 5: the output ---
        counts = self._write(parts, keep_user, keep_item, user_counts)
        clock.lap("wrote {} events, {} users, {} items".format(*counts))
        return Built(raw_counts, counts, dropped, bool(self.has_ratings))

    def _part_path(self, kind: str, p: int, column: str) -> Path:
        return self.work / f"{kind}-{p:05d}.{column}"

    def _spill(self, parts: int, num_users: int) -> int:
        type_index = pa.array(self.type_names, pa.string())
        total = 0
        for batch, _ in self._batches():
            n = batch.num_rows
            if n == 0:
                continue
            users = self.users.codes(batch.column("user"))
            columns = {
                "user": users.astype(np.int32),
                "item": self.items.codes(batch.column("item")).astype(np.int32),
                "timestamp": batch.column("timestamp").to_numpy().astype(np.int64, copy=False),
            }
            if self.has_ratings:
                columns["rating"] = batch.column("rating").to_numpy().astype(np.float64, copy=False)
            if self.has_types:
                columns["event_type"] = pc.index_in(batch.column("event_type"), value_set=type_index).to_numpy(
                    zero_copy_only=False).astype(np.uint16)
            part = users * parts // num_users
            if parts == 1:
                for column, values in columns.items():
                    _append(self._part_path("spill", 0, column), values)
            else:
                order = np.argsort(part, kind="stable")  # stable: file order within each partition
                bounds = np.searchsorted(part[order], np.arange(parts + 1))
                for p in np.flatnonzero(np.diff(bounds)):
                    rows = order[bounds[p] : bounds[p + 1]]
                    for column, values in columns.items():
                        _append(self._part_path("spill", int(p), column), values[rows])
            total += n
        return total

    def _sort_partition(self, p: int, parts: int, num_users: int, user_counts: np.ndarray,
                        item_counts: np.ndarray) -> int:
        """Pass 3 on partition p: returns its duplicates."""
        dtypes = dict(_SPILL)
        spill = {c: _read(self._part_path("spill", p, c), dtypes[c]) for c in self._spill_columns()}
        for c in spill:
            self._part_path("spill", p, c).unlink(missing_ok=True)
        users, stamps = spill["user"], spill["timestamp"]
        if len(users) == 0:
            return 0
        order = _by_user_then_time(users, stamps)
        del users, stamps
        for c in list(spill):  # one column at a time, so at most one extra copy is alive
            spill[c] = spill[c][order]
        del order
        keep = _not_duplicates(spill)
        duplicates = int(len(keep) - keep.sum())
        if duplicates:
            spill = {c: v[keep] for c, v in spill.items()}
        first = -(-p * num_users // parts)  # the partition's first user code
        last = -(-(p + 1) * num_users // parts)
        user_counts[first:last] += np.bincount(spill["user"] - first, minlength=last - first)
        item_counts += np.bincount(spill["item"], minlength=len(item_counts))
        for c, dtype in _CLEAN:
            if c in spill:
                spill[c].astype(dtype, copy=False).tofile(self._part_path("clean", p, c))
        return duplicates

    def _spill_columns(self) -> list[str]:
        return ["user", "item", "timestamp"] + (["rating"] if self.has_ratings else []) + (
            ["event_type"] if self.has_types else [])

    def _kcore(self, parts: int, user_counts: np.ndarray, item_counts: np.ndarray, duplicates: int,
               filtered: int) -> tuple[np.ndarray, np.ndarray, Dropped]:
        """Pass 4: returns (users kept, items kept, what was dropped); ``user_counts`` ends as the kept
        users' event counts."""
        k = self.kcore
        present_user, present_item = user_counts > 0, item_counts > 0
        keep_user, keep_item = user_counts >= k.min_user_events, item_counts >= k.min_item_events
        user_events = item_events = rounds = 0
        # Until no user or item that still has events falls short.
        while (present_user & ~keep_user).any() or (present_item & ~keep_item).any():
            rounds += 1
            user_counts[:] = 0
            item_counts[:] = 0
            for p in range(parts):
                users = _read(self._part_path("clean", p, "user"), np.int32)
                items = _read(self._part_path("clean", p, "item"), np.int32)
                was = present_user[users] & present_item[items]  # still in before this round
                now = keep_user[users] & keep_item[items]
                gone = was & ~now
                by_user = gone & ~keep_user[users]
                user_events += int(by_user.sum())
                item_events += int(gone.sum() - by_user.sum())
                user_counts += np.bincount(users[now], minlength=len(user_counts))
                item_counts += np.bincount(items[now], minlength=len(item_counts))
            present_user, present_item = user_counts > 0, item_counts > 0
            keep_user &= user_counts >= k.min_user_events
            keep_item &= item_counts >= k.min_item_events
        # Every distinct id has at least one event after the duplicates go (they only repeat one).
        dropped = Dropped(
            duplicate_rows=duplicates,
            short_users=int((~keep_user).sum()),
            short_user_events=user_events,
            short_items=int((~keep_item).sum()),
            short_item_events=item_events,
            other_event_types=filtered,
            kcore_rounds=rounds,
        )
        name = self.stream.source
        if filtered:
            log.warning("%s: dropped %d events of other types than %s", name, filtered, self.keep_types.to_pylist())
        if dropped.short_users:
            log.warning("%s: dropped %d users with fewer than %d events (%d events)",
                        name, dropped.short_users, k.min_user_events, dropped.short_user_events)
        if k.min_item_events > 1 and dropped.short_items:
            log.warning("%s: dropped %d items with fewer than %d events (%d events)",
                        name, dropped.short_items, k.min_item_events, dropped.short_item_events)
        if rounds > 1:
            log.info("%s: the k-core filter took %d rounds", name, rounds)
        return keep_user, keep_item, dropped

    def _write(self, parts: int, keep_user: np.ndarray, keep_item: np.ndarray, user_counts: np.ndarray) -> Counts:
        lengths = user_counts[keep_user]
        total = int(lengths.sum())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.out / OFFSETS_FILE, offsets)
        item_ids = np.cumsum(keep_item, dtype=np.int64).astype(np.int32)  # dense id of each kept item code
        num_items = int(keep_item.sum())
        if num_items >= np.iinfo(np.int32).max:
            raise ValueError(f"{num_items} items do not fit the int32 item ids")
        writers = {"item": _NpyWriter(self.out / ITEMS_FILE, np.int32, total),
                   "timestamp": _NpyWriter(self.out / TIMESTAMPS_FILE, np.int64, total)}
        if self.has_ratings:
            writers["rating"] = _NpyWriter(self.out / RATINGS_FILE, np.float32, total)
        else:
            (self.out / RATINGS_FILE).unlink(missing_ok=True)
        try:
            for p in range(parts):
                users = _read(self._part_path("clean", p, "user"), np.int32)
                items = _read(self._part_path("clean", p, "item"), np.int32)
                now = keep_user[users] & keep_item[items]
                del users
                writers["item"].write(item_ids[items[now]])
                del items
                writers["timestamp"].write(_read(self._part_path("clean", p, "timestamp"), np.int64)[now])
                if self.has_ratings:
                    writers["rating"].write(_read(self._part_path("clean", p, "rating"), np.float32)[now])
                for c, _ in _CLEAN:
                    self._part_path("clean", p, c).unlink(missing_ok=True)
        finally:
            for writer in writers.values():
                writer.close()
        pq.write_table(pa.table({"raw_user": self.users.raw(keep_user)}), self.out / USERS_TABLE)
        raw_items = self.items.raw(keep_item)
        titles = _titles_for(raw_items, self.stream)
        pq.write_table(pa.table({"item_id": pa.array(np.arange(1, num_items + 1, dtype=np.int64)),
                                 "raw_item": raw_items, "title": titles}), self.out / ITEMS_TABLE)
        return Counts(total, len(lengths), num_items)


def _by_user_then_time(users: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """The order of events by (user, timestamp), ties in their current (file) order.

    One 64-bit key when the values fit: with the position as its last bits, every key is distinct and
    an unstable sort (numpy's fastest) keeps ties in order; else (user, time) and a stable sort; else
    lexsort."""
    n = len(users)
    first, t0 = int(users.min()), int(stamps.min())
    user_bits = (int(users.max()) - first).bit_length()
    time_bits = (int(stamps.max()) - t0).bit_length()
    pos_bits = max(n - 1, 0).bit_length()
    if user_bits + time_bits + pos_bits <= 63:
        key = ((users.astype(np.int64) - first) << (time_bits + pos_bits)) | ((stamps - t0) << pos_bits)
        key |= np.arange(n, dtype=np.int64)
        key.sort()
        key &= (1 << pos_bits) - 1
        return key
    if user_bits + time_bits <= 63:
        key = ((users.astype(np.int64) - first) << time_bits) | (stamps - t0)
        return np.argsort(key, kind="stable")
    return np.lexsort((stamps, users))


class _Clock:
    def __init__(self, name: str) -> None:
        self.name, self.start = name, time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        log.info("%s: %s (%.1f s)", self.name, what, now - self.start)
        self.start = now


def _not_duplicates(spill: dict[str, np.ndarray]) -> np.ndarray:
    """[n] False for an exact duplicate of an earlier event, for a partition sorted by (user,
    timestamp) with ties in file order: only events tied on (user, timestamp) can be duplicates."""
    users, stamps = spill["user"], spill["timestamp"]
    keep = np.ones(len(users), dtype=bool)
    tied = (users[1:] == users[:-1]) & (stamps[1:] == stamps[:-1])
    if not tied.any():
        return keep
    # The rows of runs of equal (user, timestamp), each with its run's number.
    in_run = np.zeros(len(users), dtype=bool)
    in_run[1:] |= tied
    in_run[:-1] |= tied
    rows = np.flatnonzero(in_run)
    run = np.cumsum(np.concatenate([[True], ~tied]))[rows]
    keys = [spill[c][rows] for c in ("event_type", "rating", "item") if c in spill]
    order = np.lexsort((*keys, run))  # stable: within equal keys, file order
    same = run[order][1:] == run[order][:-1]
    for key in keys:
        same &= key[order][1:] == key[order][:-1]
    keep[rows[order][1:][same]] = False
    return keep


def _titles_for(raw_items: pa.Array, stream: EventStream) -> pa.Array:
    if stream.titles_are_ids:
        return raw_items.cast(pa.string())
    if stream.titles is None:
        return pa.nulls(len(raw_items), pa.string())
    by_item = stream.titles.drop_duplicates("item").set_index("item")["title"]
    found = by_item.reindex(pd.Index(raw_items.to_pylist())).to_numpy(dtype=object)
    return pa.array([None if pd.isna(t) else str(t) for t in found], pa.string())
