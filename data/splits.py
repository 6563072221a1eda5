"""The splits: leave-one-out, as generative-recommenders does them, or temporal (docs/architecture.md).

Leave-one-out (the default, ``SplitKind.LEAVE_ONE_OUT``):

For a user's full chronological sequence ``s`` of n events, every split is "a history, then the
item that follows it"; the splits differ only in where the target sits:

    test    history s[:n-1], target s[n-1]
    valid   history s[:n-2], target s[n-2]
    train   the sequence s[:n-1] (s[:n-2] with exclude_validation_from_train), i.e. history
            s[:n-2] and target s[n-2] (history s[:n-3], target s[n-3]); the model also learns
            the next item at every earlier position of that history.

So by default the train target is the validation target (as in generative-recommenders);
``exclude_validation_from_train`` keeps the validation item out of training. Histories keep the
most recent ``max_seq_len`` items. A user whose history would be empty is skipped for that split.

Temporal (``SplitKind.TEMPORAL``, two global cut times ``valid_start < test_start``, in seconds): with
``a`` the number of the user's events before ``valid_start`` and ``b`` the number before ``test_start``,

    test    history s[:b], target s[b]: the user's first event at or after test_start
    valid   history s[:a], target s[a]: the first event at or after valid_start, if before test_start
    train   the sequence s[:b] (s[:a] with exclude_validation_from_train): every event before the cut

A user without an event before a cut (nothing to condition on) or without one after it is not
evaluated on that split; events after the test target are never used. Every user is ranked at the
same moment, so nothing after ``test_start`` leaks into any history or into training. As with
leave-one-out, training sees the validation targets unless ``exclude_validation_from_train``.

Example::

    >>> split_sequence([5, 6, 7, 8], Split.TEST, max_seq_len=2)
    ([6, 7], 8)
    >>> split_sequence([5, 6, 7, 8], Split.TRAIN, max_seq_len=10, exclude_validation_from_train=True)
    ([5], 6)
    >>> split_sequence([5, 6], Split.VALID, max_seq_len=10) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from data.sequences import UserSequences

T = TypeVar("T")


class SeenItems(StrEnum):
    """Which of a user's items count as already seen: never recommended, and not ranked against the
    target in evaluation. One rule for evaluation, predictions and serving (``data.exclude_seen``,
    carried into the export, the server's default).

    HISTORY: every item of the user's history before the target; what a user expects of a
        recommender (a movie seen 300 events ago is not news).
    WINDOW: the items of the window the model reads (the last ``max_seq_len`` events), as
        generative-recommenders evaluates: its published numbers compare with these.
    """

    HISTORY = "history"
    WINDOW = "window"


class Split(StrEnum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"

    @property
    def is_eval(self) -> bool:
        return self is not Split.TRAIN


class SplitKind(StrEnum):
    LEAVE_ONE_OUT = "leave_one_out"
    TEMPORAL = "temporal"


@dataclass(frozen=True)
class SplitConfig:
    """Where each split's target sits (module docstring).

    Attributes:
        kind: leave-one-out or temporal.
        valid_start, test_start: temporal only: the cut times, whole seconds since the epoch (UTC);
            ``valid_start < test_start``.
    """

    kind: SplitKind = SplitKind.LEAVE_ONE_OUT
    valid_start: int = 0
    test_start: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SplitKind(self.kind))
        if self.kind is SplitKind.TEMPORAL and not 0 <= self.valid_start < self.test_start:
            raise ValueError(f"a temporal split needs 0 <= valid_start < test_start, got valid_start="
                             f"{self.valid_start}, test_start={self.test_start}")


def split_targets(
    sequences: UserSequences,
    split: Split,
    config: SplitConfig = SplitConfig(),
    *,
    exclude_validation_from_train: bool = False,
    chunk_events: int = 1 << 24,
) -> np.ndarray:
    """[U] index of each user's target within their full sequence; < 1 means the user is skipped.

    Leave-one-out depends on the lengths only; temporal reads the timestamps, ``chunk_events`` at a
    time (they may be a memory-mapped file of any size)."""
    split = Split(split)
    if config.kind is SplitKind.LEAVE_ONE_OUT:
        return target_positions(sequences.lengths, split, exclude_validation_from_train=exclude_validation_from_train)
    before_valid = _events_before(sequences, config.valid_start, chunk_events)
    before_test = _events_before(sequences, config.test_start, chunk_events)
    lengths = sequences.lengths
    if split is Split.TEST:
        return np.where(before_test < lengths, before_test, -1)
    if split is Split.VALID:
        return np.where(before_valid < before_test, before_valid, -1)
    end = before_valid if exclude_validation_from_train else before_test
    return end - 1


def _events_before(sequences: UserSequences, cut: int, chunk_events: int) -> np.ndarray:
    """[U] how many of each user's events come before ``cut`` (their timestamps are sorted)."""
    offsets = np.asarray(sequences.offsets)
    out = np.empty(len(sequences), dtype=np.int64)
    user = 0
    while user < len(sequences):
        # Users whose events fit in one chunk (at least one user, however long).
        last = max(int(np.searchsorted(offsets, offsets[user] + chunk_events, side="right")) - 1, user + 1)
        last = min(last, len(sequences))
        lo = int(offsets[user])
        early = np.asarray(sequences.timestamps[lo : int(offsets[last])]) < cut
        running = np.concatenate([[0], np.cumsum(early, dtype=np.int64)])
        bounds = offsets[user : last + 1] - lo
        out[user:last] = running[bounds[1:]] - running[bounds[:-1]]
        user = last
    return out


def target_positions(
    lengths: np.ndarray | int, split: Split, *, exclude_validation_from_train: bool = False
) -> np.ndarray:
    """Index of the target within each full sequence of the given length(s); < 1 means skipped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    from_end = {Split.TEST: 1, Split.VALID: 2, Split.TRAIN: 3 if exclude_validation_from_train else 2}
    return lengths - from_end[Split(split)]


def history_bounds(
    lengths: np.ndarray | int, split: Split, max_seq_len: int, *, exclude_validation_from_train: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(start, target) positions within each sequence (leave-one-out): the history is
    ``s[start:target]``, at most ``max_seq_len`` long. Only meaningful where ``target >= 1``."""
    target = target_positions(lengths, split, exclude_validation_from_train=exclude_validation_from_train)
    return window_start(target, max_seq_len), target


def window_start(target: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Where the history before each target starts: at most ``max_seq_len`` events back."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    return np.maximum(np.asarray(target) - max_seq_len, 0)


def split_sequence(
    sequence: Sequence[T], split: Split, max_seq_len: int, *, exclude_validation_from_train: bool = False
) -> tuple[list[T], T] | None:
    """(history, target) of one user's full chronological sequence, or None when it is too short."""
    start, target = history_bounds(
        len(sequence), split, max_seq_len, exclude_validation_from_train=exclude_validation_from_train
    )
    start, target = int(start), int(target)
    if target < 1:
        return None
    return list(sequence[start:target]), sequence[target]
