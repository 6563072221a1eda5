"""The synthetic generator: seeded, Zipf-like popularity, long-tailed lengths, increasing time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.synthetic import SyntheticConfig, synthetic_interactions

CONFIG = SyntheticConfig(num_users=2000, num_items=1000, mean_length=20, seed=5)


def test_same_seed_same_table_other_seed_other_table() -> None:
    a = synthetic_interactions(CONFIG).frame
    pd.testing.assert_frame_equal(a, synthetic_interactions(CONFIG).frame)
    b = synthetic_interactions(SyntheticConfig(num_users=2000, num_items=1000, mean_length=20, seed=6)).frame
    assert not a.equals(b)
    assert synthetic_interactions(CONFIG).checksum != synthetic_interactions(
        SyntheticConfig(num_users=2000, num_items=1000, mean_length=20, seed=6)
    ).checksum


def test_shape_of_the_data() -> None:
    frame = synthetic_interactions(CONFIG).frame
    lengths = frame.groupby("user").size()
    assert len(lengths) == 2000 and lengths.min() >= 2
    assert 15 < lengths.mean() < 25  # the configured mean, give or take clipping and noise
    assert lengths.max() > 8 * lengths.median()  # a long tail
    counts = frame["item"].value_counts().to_numpy()
    assert counts[:100].sum() > 0.5 * len(frame)  # the top 10% of items take most events
    assert frame["item"].between(1, 1000).all()
    # Each user's timestamps strictly increase, though rows are shuffled.
    by_time = frame.sort_values(["user", "timestamp"])
    assert (by_time.groupby("user")["timestamp"].diff().dropna() > 0).all()
    assert not frame["user"].is_monotonic_increasing
    assert frame["timestamp"].dtype == np.int64


def test_min_item_events_covers_the_catalogue() -> None:
    config = SyntheticConfig(num_users=300, num_items=2000, mean_length=20, min_item_events=2, seed=1)
    counts = synthetic_interactions(config).frame["item"].value_counts()
    assert len(counts) == 2000 and counts.min() >= 2
    assert counts.max() > 20  # the Zipf draws on top still make some items popular
    with pytest.raises(ValueError, match="cannot give each"):
        synthetic_interactions(SyntheticConfig(num_users=10, num_items=2000, min_item_events=1))
