"""Seeded synthetic interactions at any scale, for tests and benchmarks.

Shaped like real logs where it matters for the pipeline: item popularity is Zipf-like (a few items
take most events), sequence lengths are long-tailed (log-normal), each user's timestamps increase,
and rows come out shuffled, as real logs are not sorted by time. The same config gives the same
table on every machine.

``write_event_file`` (``python -m data.synthetic --out FILE``) writes such a log of any size to a csv
or Parquet file, a chunk of users at a time: the example dataset of the README and ``make bench-data``.

Example::

    >>> data = synthetic_interactions(SyntheticConfig(num_users=50, num_items=20, seed=1))
    >>> data.counts().users, bool((data.frame.item <= 20).all())
    (50, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.interactions import DatasetSource, Interactions

GENERATOR_VERSION = 1
"""Bump when the same config starts producing a different table (it invalidates caches)."""


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 1000
    num_items: int = 500
    mean_length: float = 20.0
    """Mean events per user before clipping to [min_length, max_length]."""
    length_sigma: float = 1.0
    """Log-normal shape of the lengths: larger means a longer tail."""
    min_length: int = 2
    max_length: int = 2000
    zipf_exponent: float = 1.1
    """Popularity of the item ranked r is proportional to r ** -zipf_exponent."""
    min_item_events: int = 0
    """Events every item gets before the Zipf draws, as in a log after a k-core filter: with 0, a large
    catalogue's tail mostly never occurs (10M items and 25M events leave ~1M items seen)."""
    seed: int = 0

    def checksum(self) -> str:
        payload = json.dumps({"generator": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def synthetic_interactions(config: SyntheticConfig = SyntheticConfig()) -> Interactions:
    """Raw ids are ints like MovieLens: users 1..num_users, items 1..num_items."""
    if config.num_users < 1 or config.num_items < 1 or not 1 <= config.min_length <= config.max_length:
        raise ValueError(f"invalid {config}")
    if config.min_item_events < 0:
        raise ValueError(f"min_item_events must be >= 0, got {config.min_item_events}")
    rng = np.random.default_rng(config.seed)
    # A log-normal with this mu has mean `mean_length`.
    mu = np.log(config.mean_length) - config.length_sigma**2 / 2
    lengths = np.rint(rng.lognormal(mu, config.length_sigma, config.num_users)).astype(np.int64)
    lengths = np.clip(lengths, config.min_length, config.max_length)
    total = int(lengths.sum())

    # Popularity ranks are shuffled over ids, so popular items are not simply the small ids.
    weights = np.arange(1, config.num_items + 1, dtype=np.float64) ** -config.zipf_exponent
    popularity = np.empty_like(weights)
    popularity[rng.permutation(config.num_items)] = weights / weights.sum()
    covered = config.num_items * config.min_item_events
    if covered > total:
        raise ValueError(f"{total} events cannot give each of {config.num_items} items {config.min_item_events}")
    items = np.concatenate([np.tile(np.arange(config.num_items), config.min_item_events),
                            rng.choice(config.num_items, size=total - covered, p=popularity)]) + 1

    users = np.repeat(np.arange(1, config.num_users + 1, dtype=np.int64), lengths)
    starts = rng.integers(1_000_000_000, 1_600_000_000, size=config.num_users)
    gaps = rng.geometric(1 / 3600, size=total)  # >= 1 s, so each user's timestamps strictly increase
    # Per-user running sums of the gaps: global cumsum minus the total before each user's first row.
    run = np.cumsum(gaps)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    before = np.repeat(run[first] - gaps[first], lengths)
    timestamps = np.repeat(starts, lengths) + run - before
    ratings = rng.integers(1, 6, size=total).astype(np.float64)

    order = rng.permutation(total)
    frame = pd.DataFrame(
        {"user": users[order], "item": items[order], "timestamp": timestamps[order], "rating": ratings[order]}
    )
    return Interactions(
        frame, source=f"synthetic:{config}", path=None, checksum=config.checksum(), raw_item_kind="int"
    )


class SyntheticSource(DatasetSource):
    def __init__(self, config: SyntheticConfig = SyntheticConfig(), name: str = "synthetic") -> None:
        self.config = config
        self.name = name

    def fingerprint(self) -> str:
        return self.config.checksum()

    def checksum(self) -> str:
        return self.config.checksum()

    def load(self) -> Interactions:
        return synthetic_interactions(self.config)


# --- synthetic event files ------------------------------------------------------------------------
EPOCH_2026 = 1_767_225_600
"""2026-01-01T00:00:00Z, where the events of ``write_event_file`` start."""


@dataclass(frozen=True)
class EventFileConfig:
    """What ``write_event_file`` writes: a log as a user might bring one, of any size.

    Attributes:
        synthetic: users, items, lengths and popularity (``SyntheticConfig``; its ``min_item_events``
            gives every item that many events first).
        fmt: "csv" (pyarrow's writer: a quoted header line) or "parquet".
        columns: the names of the user, item, timestamp and rating columns.
        implicit: no rating column.
        string_ids: ids as strings ("u17", "i42") instead of integers.
        timestamp_type: "int" (seconds) or, Parquet only, "timestamp" (an Arrow timestamp[ms, UTC]).
        span_days: each event's time is uniform in [2026-01-01, + span_days): every user's events
            interleave with everyone's over one period, as in a real log (so a global cut time splits
            most users' histories).
        chunk_users: users generated at a time: memory is bounded by this, not by the file's size.
    """

    synthetic: SyntheticConfig = SyntheticConfig()
    fmt: str = "csv"
    columns: tuple[str, str, str, str] = ("user", "item", "timestamp", "rating")
    implicit: bool = False
    string_ids: bool = False
    timestamp_type: str = "int"
    span_days: float = 90.0
    chunk_users: int = 200_000


def write_event_file(path: Path | str, config: EventFileConfig = EventFileConfig()) -> int:
    """Writes a synthetic event log to ``path`` a chunk of users at a time; returns the events written.

    Rows are shuffled within each chunk (a log is not sorted by user); the same config gives the same
    file. Item popularity is Zipf-like as in ``synthetic_interactions`` (not the same draws)."""
    s = config.synthetic
    if s.num_users < 1 or s.num_items < 1 or not 1 <= s.min_length <= s.max_length:
        raise ValueError(f"invalid {s}")
    if config.fmt not in ("csv", "parquet") or config.timestamp_type not in ("int", "timestamp"):
        raise ValueError(f"invalid {config}")
    if config.timestamp_type == "timestamp" and config.fmt != "parquet":
        raise ValueError("timestamp_type 'timestamp' is for Parquet files")
    rng = np.random.default_rng(s.seed)
    weights = np.arange(1, s.num_items + 1, dtype=np.float64) ** -s.zipf_exponent
    cdf = np.empty_like(weights)
    cdf[rng.permutation(s.num_items)] = weights  # popularity ranks shuffled over the ids
    np.cumsum(cdf, out=cdf)
    cdf /= cdf[-1]
    mu = np.log(s.mean_length) - s.length_sigma**2 / 2
    span = int(config.span_days * 86_400)
    chunks = -(-s.num_users // config.chunk_users)
    user_col, item_col, time_col, rating_col = config.columns
    written, writer = 0, None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for c in range(chunks):
            first = c * config.chunk_users
            users = np.arange(first, min(first + config.chunk_users, s.num_users), dtype=np.int64) + 1
            lengths = np.clip(np.rint(rng.lognormal(mu, s.length_sigma, len(users))).astype(np.int64),
                              s.min_length, s.max_length)
            n = int(lengths.sum())
            # Every item's guaranteed events, spread over the chunks; Zipf draws for the rest.
            lo, hi = c * s.num_items // chunks, (c + 1) * s.num_items // chunks
            covered = np.tile(np.arange(lo, hi, dtype=np.int64), s.min_item_events)
            if covered.size > n:
                raise ValueError(f"{n} events of users {first + 1}.. cannot give {hi - lo} items {s.min_item_events}")
            draws = np.searchsorted(cdf, np.sort(rng.random(n - covered.size)))  # sorted: fast lookups
            items = np.concatenate([covered, np.minimum(draws, s.num_items - 1)]) + 1
            rng.shuffle(items)
            order = rng.permutation(n)
            columns = {
                user_col: np.repeat(users, lengths)[order],
                item_col: items,
                time_col: EPOCH_2026 + rng.integers(0, span, n),
            }
            if not config.implicit:
                columns[rating_col] = rng.integers(1, 6, n).astype(np.float64)
            table = pa.table({name: _column(name, values, config) for name, values in columns.items()})
            if writer is None:
                writer = (pacsv.CSVWriter(str(path), table.schema) if config.fmt == "csv"
                          else pq.ParquetWriter(str(path), table.schema))
            writer.write_table(table)
            written += n
    finally:
        if writer is not None:
            writer.close()
    return written


def _column(name: str, values: np.ndarray, config: EventFileConfig) -> pa.Array:
    user_col, item_col, time_col, _ = config.columns
    if name in (user_col, item_col) and config.string_ids:
        prefix = "u" if name == user_col else "i"
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")
    if name == time_col and config.timestamp_type == "timestamp":
        return pa.array(values * 1000, pa.timestamp("ms", tz="UTC"))
    return pa.array(values)


def main(argv: list[str] | None = None) -> None:
    """``python -m data.synthetic --out FILE ...``: writes a synthetic event file (csv or Parquet)."""
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=main.__doc__)
    parser.add_argument("--out", required=True, help="the file to write (.csv or .parquet)")
    parser.add_argument("--implicit", action="store_true", help="no rating column")
    parser.add_argument("--string-ids", action="store_true", help='ids as strings ("u17", "i42")')
    parser.add_argument("--column-names", default="user,item,timestamp,rating",
                        help="names of the user, item, timestamp and rating columns")
    parser.add_argument("--timestamp-type", choices=["int", "timestamp"], default="int")
    parser.add_argument("--span-days", type=float, default=90.0)
    for f in dataclasses.fields(SyntheticConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    names = tuple(args.column_names.split(","))
    if len(names) != 4:
        raise SystemExit("--column-names needs 4 names: user, item, timestamp, rating")
    synthetic = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    out = Path(args.out)
    config = EventFileConfig(synthetic, fmt="parquet" if out.suffix == ".parquet" else "csv",
                             columns=names, implicit=args.implicit, string_ids=args.string_ids,  # type: ignore[arg-type]
                             timestamp_type=args.timestamp_type, span_days=args.span_days)
    n = write_event_file(out, config)
    print(f"{out}: {n} events, {synthetic.num_users} users, {synthetic.num_items} items")


if __name__ == "__main__":
    main()
