"""Leave-one-out splits, as generative-recommenders does them (see docs/architecture.md).

For a user's full chronological sequence ``s`` of n events, every split is "a history, then the
item that follows it"; the splits differ only in where the target sits:

    test    history s[:n-1], target s[n-1]
    valid   history s[:n-2], target s[n-2]
    train   the sequence s[:n-1] (s[:n-2] with exclude_validation_from_train), i.e. history
            s[:n-2] and target s[n-2] (history s[:n-3], target s[n-3]); the model also learns
            the next item at every earlier position of that history.

So by default the train target is the validation target (as in generative-recommenders);
``exclude_validation_from_train`` keeps the validation item out of training. Histories keep the
most recent ``max_len`` items. A user whose history would be empty is skipped for that split.

Example::

    >>> split_sequence([5, 6, 7, 8], Split.TEST, max_len=2)
    ([6, 7], 8)
    >>> split_sequence([5, 6, 7, 8], Split.TRAIN, max_len=10, exclude_validation_from_train=True)
    ([5], 6)
    >>> split_sequence([5, 6], Split.VALID, max_len=10) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TypeVar

import numpy as np

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


def target_positions(
    lengths: np.ndarray | int, split: Split, *, exclude_validation_from_train: bool = False
) -> np.ndarray:
    """Index of the target within each full sequence of the given length(s); < 1 means skipped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    from_end = {Split.TEST: 1, Split.VALID: 2, Split.TRAIN: 3 if exclude_validation_from_train else 2}
    return lengths - from_end[Split(split)]


def history_bounds(
    lengths: np.ndarray | int, split: Split, max_len: int, *, exclude_validation_from_train: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(start, target) positions within each sequence: the history is ``s[start:target]``, at most
    ``max_len`` long. Only meaningful where ``target >= 1``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    target = target_positions(lengths, split, exclude_validation_from_train=exclude_validation_from_train)
    return np.maximum(target - max_len, 0), target


def split_sequence(
    sequence: Sequence[T], split: Split, max_len: int, *, exclude_validation_from_train: bool = False
) -> tuple[list[T], T] | None:
    """(history, target) of one user's full chronological sequence, or None when it is too short."""
    start, target = history_bounds(
        len(sequence), split, max_len, exclude_validation_from_train=exclude_validation_from_train
    )
    start, target = int(start), int(target)
    if target < 1:
        return None
    return list(sequence[start:target]), sequence[target]
