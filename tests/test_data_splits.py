"""Splits: leave-one-out positions, truncation, skipping and targets on real data; the temporal split
by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.formats import FileSource
from data.interactions import Interactions
from data.loader import BatchPlan, SplitDataset
from data.prepare import PreparedDataset
from data.splits import Split, SplitConfig, SplitKind, history_bounds, split_sequence, split_targets

FIXTURES = Path(__file__).parent / "fixtures"
S = [10, 11, 12, 13, 14]  # a user's full sequence, oldest first


@pytest.mark.parametrize(
    ("split", "exclude", "expected"),
    [
        (Split.TEST, False, ([10, 11, 12, 13], 14)),
        (Split.VALID, False, ([10, 11, 12], 13)),
        (Split.TRAIN, False, ([10, 11, 12], 13)),  # train sequence s[:n-1]: history s[:n-2], target s[n-2]
        (Split.TRAIN, True, ([10, 11], 12)),  # train sequence s[:n-2]
        (Split.TEST, True, ([10, 11, 12, 13], 14)),  # the flag only changes train
    ],
)
def test_split_positions(split: Split, exclude: bool, expected: tuple[list[int], int]) -> None:
    assert split_sequence(S, split, max_seq_len=100, exclude_validation_from_train=exclude) == expected


def test_histories_keep_the_most_recent_max_seq_len() -> None:
    assert split_sequence(S, Split.TEST, max_seq_len=2) == ([12, 13], 14)
    assert split_sequence(S, Split.TRAIN, max_seq_len=1) == ([12], 13)
    with pytest.raises(ValueError, match="max_seq_len"):
        split_sequence(S, Split.TEST, max_seq_len=0)


@pytest.mark.parametrize(
    ("split", "exclude", "shortest"),
    [(Split.TEST, False, 2), (Split.VALID, False, 3), (Split.TRAIN, False, 3), (Split.TRAIN, True, 4)],
)
def test_too_short_users_are_skipped(split: Split, exclude: bool, shortest: int) -> None:
    for n in range(shortest + 3):
        result = split_sequence(list(range(n)), split, 10, exclude_validation_from_train=exclude)
        assert (result is None) == (n < shortest)


def test_vectorised_bounds_match_the_scalar_split() -> None:
    lengths = np.arange(0, 30)
    for split in Split:
        start, target = history_bounds(lengths, split, max_seq_len=7)
        for n, lo, t in zip(lengths, start, target, strict=True):
            seq = list(range(100, 100 + n))
            result = split_sequence(seq, split, 7)
            assert result == (None if t < 1 else (seq[lo:t], seq[t]))


def test_skipped_users_are_counted() -> None:
    ds = PreparedDataset.from_interactions(FileSource(FIXTURES / "formats" / "movielens-dat").load(), "dat")
    lengths = ds.packed.lengths.tolist()
    assert lengths == [3, 2, 3]
    valid = SplitDataset(ds.packed, Split.VALID, max_seq_len=10, num_items=ds.num_items)
    assert valid.skipped == 1 and valid.users.tolist() == [0, 2]
    train = SplitDataset(
        ds.packed, Split.TRAIN, max_seq_len=10, num_items=ds.num_items, exclude_validation_from_train=True
    )
    assert train.skipped == 3 and len(train) == 0


def test_targets_are_the_last_events_by_time_then_file_order() -> None:
    interactions = FileSource(FIXTURES / "ml-latest-small").load()
    ds = PreparedDataset.from_interactions(interactions, "slice")
    frame = interactions.frame.assign(position=np.arange(len(interactions.frame)))
    ordered = frame.sort_values(["user", "timestamp", "position"])
    last_two = ordered.groupby("user")["item"].apply(lambda s: s.tolist()[-2:])
    # The slice has same-second ratings at the end of some users' logs, so file order matters here.
    last_ts = ordered.groupby("user")["timestamp"].apply(lambda s: s.tolist()[-2:])
    assert any(a == b for a, b in last_ts), "fixture should hold a tie in the last two events"

    raw_item = ds.items.set_index("item_id")["raw_item"]
    for split, which in ((Split.TEST, -1), (Split.VALID, 0)):
        data = SplitDataset(ds.packed, split, max_seq_len=5, num_items=ds.num_items)
        batch = data[BatchPlan(0, np.arange(len(data)))]
        users = ds.raw_users.to_numpy()[batch.user_ids.numpy()]
        targets = raw_item[batch.targets().numpy()].to_numpy()
        assert dict(zip(users.tolist(), targets.tolist(), strict=True)) == {
            u: items[which] for u, items in last_two.items()
        }
        assert batch.lengths.max().item() == 5  # truncated to max_seq_len


# --- the temporal split -------------------------------------------------------------------------
VALID_START, TEST_START = 25, 42
TEMPORAL = SplitConfig(SplitKind.TEMPORAL, valid_start=VALID_START, test_start=TEST_START)
# Each event's item is named by its time, so a history reads as the times of its events.
TIMES = {"a": [10, 20, 30, 40, 50], "b": [5, 35], "c": [45, 60], "d": [1, 2], "e": [25, 42, 43]}


@pytest.fixture(scope="module")
def timeline() -> PreparedDataset:
    rows = [(user, t, t, 1.0) for user, times in TIMES.items() for t in times]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    return PreparedDataset.from_interactions(Interactions(frame, "timeline", None, "0" * 64), "timeline")


def split_of(ds: PreparedDataset, split: Split, **kwargs: object) -> dict[str, tuple[list[int], int]]:
    """raw user -> (history as raw items, raw target) of every user the split keeps."""
    data = SplitDataset(ds.packed, split, max_seq_len=10, num_items=ds.num_items, split_config=TEMPORAL, **kwargs)
    if len(data) == 0:
        return {}
    batch = data[BatchPlan(0, np.arange(len(data)))]
    raw = ds.items["raw_item"].to_numpy()
    users = ds.raw_users.to_numpy()[batch.user_ids.numpy()]
    return {str(u): ([int(raw[i - 1]) for i in h], int(raw[t - 1]))
            for u, h, t in zip(users, batch.sequences(), batch.targets().tolist(), strict=True)}


def test_temporal_split_by_hand(timeline: PreparedDataset) -> None:
    """Test: the first event at or after test_start, after every earlier one; valid: the first at or
    after valid_start when it is before test_start; train: everything before test_start (before
    valid_start without the validation targets). A user with nothing before a cut, or nothing after
    it, is not in that split."""
    assert split_of(timeline, Split.TEST) == {
        "a": ([10, 20, 30, 40], 50),
        "e": ([25], 42),  # 42 is at test_start: a test target; 43 after it is never used
    }  # b and d have nothing at or after 42; c nothing before it
    assert split_of(timeline, Split.VALID) == {
        "a": ([10, 20], 30),
        "b": ([5], 35),
    }  # e's first event is at valid_start itself, with no history
    assert split_of(timeline, Split.TRAIN) == {
        "a": ([10, 20, 30], 40),
        "b": ([5], 35),
        "d": ([1], 2),
    }
    assert split_of(timeline, Split.TRAIN, exclude_validation_from_train=True) == {
        "a": ([10], 20),
        "d": ([1], 2),
    }


def test_temporal_split_needs_ordered_cuts() -> None:
    with pytest.raises(ValueError, match="valid_start < test_start"):
        SplitConfig(SplitKind.TEMPORAL, valid_start=5, test_start=5)
    SplitConfig(SplitKind.LEAVE_ONE_OUT)  # no cuts needed


def test_temporal_counts_in_chunks_equal_one_pass(timeline: PreparedDataset) -> None:
    for split in Split:
        one = split_targets(timeline.packed, split, TEMPORAL)
        for chunk in (1, 2, 3, 7):
            np.testing.assert_array_equal(split_targets(timeline.packed, split, TEMPORAL, chunk_events=chunk), one)
