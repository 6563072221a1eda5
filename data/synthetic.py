"""Seeded synthetic interactions at any scale, for tests and benchmarks.

Shaped like real logs where it matters for the pipeline: item popularity is Zipf-like (a few items
take most events), sequence lengths are long-tailed (log-normal), each user's timestamps increase,
and rows come out shuffled, as real logs are not sorted by time. The same config gives the same
table on every machine.

Example::

    >>> data = synthetic_interactions(SyntheticConfig(num_users=50, num_items=20, seed=1))
    >>> data.counts().users, bool((data.frame.item <= 20).all())
    (50, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
