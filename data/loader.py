"""The DataLoader: prepared sequences -> ``SeqBatch``es, sharded over ranks, resumable mid-epoch.

The sampler decides which users form each batch (a ``BatchPlan``); the dataset builds the whole
``SeqBatch`` for a plan with a few numpy gathers, so there is no per-sample collate.

Guarantees:
- Every rank gets the same number of batches, and every batch has exactly ``batch_size`` rows, so
  collectives never wait on a rank that ran out.
  - train: users are shuffled by (seed, epoch); the epoch's order is wrapped around to a whole number
    of global batches (``batch_size * world_size`` rows; a few users appear twice per epoch, none is
    dropped) and dealt round-robin to the ranks. Batch k of all ranks together is therefore batch k of
    a single process with the global batch size: N ranks train on exactly what one rank would.
  - valid/test: no shuffle and no negatives; users are dealt round-robin so each is covered
    exactly once across ranks, and the last batches are filled with padding rows (``user_ids ==
    PADDING_USER``, history ``[0]``, target 0) that the evaluator drops.
- Negatives are ``num_negatives`` ids drawn uniformly from 1..num_items per batch (the shared pool,
  key "negative"), from a generator seeded by (seed, epoch, batch index): the same pool on every rank,
  as one process would draw it for the global batch, and a loader made with ``start_batch=k`` yields
  exactly the batches k, k+1, ... of an uninterrupted epoch.

Example::

    >>> from data.prepare import PreparedDataset
    >>> from data.synthetic import synthetic_interactions
    >>> dataset = PreparedDataset.from_interactions(synthetic_interactions(), "synthetic")
    >>> loader = make_dataloader(dataset, Split.TRAIN, batch_size=128, max_seq_len=50, num_negatives=512,
    ...                          seed=0, epoch=3, rank=1, world_size=2)
    >>> batch = next(iter(loader))
    >>> len(loader), batch.batch_size, batch.negatives().numel()
    (4, 128, 512)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.batch import SeqBatch, make_features
from data.sequences import UserSequences
from data.splits import SeenItems, Split, SplitConfig, split_targets, window_start

if TYPE_CHECKING:  # only a type here; importing it would pull in the file readers
    from data.prepare import PreparedDataset

log = logging.getLogger(__name__)

PADDING_USER = -1
"""``user_ids`` of padding rows in eval batches (every real eval row carries its user index)."""


class Padding(StrEnum):
    WRAP = "wrap"
    """Wrap the epoch's order around to whole global batches: its first users again (training)."""
    MASK = "mask"
    """Fill it with padding rows, ``user_ids == PADDING_USER`` (evaluation)."""


class BatchPlan(NamedTuple):
    """One batch to build: its index within this rank's epoch, and its rows (indices into the
    split's users, ``-1`` for padding, always at the end)."""

    index: int
    rows: np.ndarray


class ShardedBatchSampler(Sampler[BatchPlan]):
    """Yields this rank's ``BatchPlan``s for one epoch, from batch ``start_batch`` on."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        padding: Padding,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_rows < 1 or (padding is Padding.WRAP and num_rows < world_size):
            raise ValueError(f"{num_rows} users cannot fill batches on {world_size} rank(s)")
        self.num_rows, self.batch_size, self.padding = num_rows, batch_size, padding
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_batches = math.ceil(num_rows / (world_size * batch_size))
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches}]")
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def shard(self) -> np.ndarray:
        """This rank's rows for the whole epoch, padded to ``num_batches * batch_size``."""
        if self.shuffle:
            # Same permutation on every rank: seeded by (seed, epoch) only.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        size = self.num_batches * self.batch_size * self.world_size
        if self.padding is Padding.WRAP:
            # np.resize repeats the order cyclically; dealing it out afterwards keeps the ranks' batch k
            # together equal to batch k of one process with the global batch size.
            return np.resize(order, size)[self.rank :: self.world_size]
        shard = order[self.rank :: self.world_size]
        return np.concatenate([shard, np.full(size // self.world_size - shard.size, -1, dtype=shard.dtype)])

    def __iter__(self) -> Iterator[BatchPlan]:
        shard, b = self.shard(), self.batch_size
        for index in range(self.start_batch, self.num_batches):
            yield BatchPlan(index, shard[index * b : (index + 1) * b])


class SplitDataset(Dataset[SeqBatch]):
    """The users eligible for one split, indexed by ``BatchPlan``: ``dataset[plan]`` is a whole batch.

    Attributes:
        users: [N] dense indices of the users long enough for the split.
        skipped: how many users were too short for it.
    """

    def __init__(
        self,
        sequences: UserSequences,
        split: Split,
        *,
        max_seq_len: int,
        num_items: int,
        num_negatives: int = 0,
        exclude_validation_from_train: bool = False,
        seed: int = 0,
        epoch: int = 0,
        seen: SeenItems = SeenItems.WINDOW,
        split_config: SplitConfig | None = None,
        sample_users: int = 0,
    ) -> None:
        if num_negatives < 0 or (num_negatives > 0 and num_items < 1):
            raise ValueError(f"cannot draw {num_negatives} negatives from {num_items} items")
        self.sequences, self.split = sequences, Split(split)
        self.num_items, self.num_negatives = num_items, num_negatives
        self.seed, self.epoch = seed, epoch
        target = split_targets(sequences, self.split, split_config or SplitConfig(),
                               exclude_validation_from_train=exclude_validation_from_train)
        start = window_start(target, max_seq_len)
        eligible = target >= 1
        if 0 < sample_users < eligible.sum():
            # A fixed sample (the seed's, not the epoch's), so every epoch validates the same users.
            chosen = np.random.default_rng(seed).choice(np.flatnonzero(eligible), sample_users, replace=False)
            eligible = np.zeros_like(eligible)
            eligible[chosen] = True
        self.users = np.flatnonzero(eligible)
        # Absolute positions in sequences.items: history is [starts, targets), the target at targets.
        first = sequences.offsets[:-1][eligible]
        self.starts, self.targets = first + start[eligible], first + target[eligible]
        self.skipped = int((target < 1).sum())
        # Under SeenItems.HISTORY an eval row carries its whole history when it reaches past the window.
        self.firsts = first if self.split.is_eval and SeenItems(seen) is SeenItems.HISTORY else None

    def __len__(self) -> int:
        return self.users.size

    def __getitem__(self, plan: BatchPlan) -> SeqBatch:
        rows = np.asarray(plan.rows, dtype=np.int64)
        real = rows[rows >= 0]
        pad = rows.size - real.size
        if (rows[real.size :] >= 0).any():
            raise ValueError("padding rows must come last in a batch")
        starts, ends = self.starts[real], self.targets[real]
        lengths = ends - starts
        index = _ranges(starts, ends)
        # The arrays may be memory-mapped files with int32 items: gathers copy, and ids go to int64.
        items = self.sequences.items[index].astype(np.int64, copy=False)
        timestamps = np.asarray(self.sequences.timestamps[index], dtype=np.int64)
        ratings = np.asarray(self.sequences.ratings[index], dtype=np.float32)
        targets, users = self.sequences.items[ends].astype(np.int64, copy=False), self.users[real]
        if pad:
            ones, zeros = np.ones(pad, dtype=np.int64), np.zeros(pad, dtype=np.int64)
            items, timestamps = np.concatenate([items, zeros]), np.concatenate([timestamps, zeros])
            ratings = np.concatenate([ratings, np.full(pad, np.nan, dtype=ratings.dtype)])
            lengths, targets = np.concatenate([lengths, ones]), np.concatenate([targets, zeros])
            users = np.concatenate([users, np.full(pad, PADDING_USER, dtype=np.int64)])
        seen_ids = seen_lengths = None
        if self.firsts is not None and (self.starts[real] > self.firsts[real]).any():
            firsts = self.firsts[real]
            seen_lengths = np.concatenate([ends - firsts, np.zeros(pad, dtype=np.int64)])
            seen_ids = self.sequences.items[_ranges(firsts, ends)].astype(np.int64, copy=False)
        lengths_t = torch.from_numpy(lengths)
        return SeqBatch(
            features=make_features(
                torch.from_numpy(items),
                lengths_t,
                torch.from_numpy(targets),
                self.negatives(plan.index),
                torch.from_numpy(ratings),
            ),
            timestamps=torch.from_numpy(timestamps),
            lengths=lengths_t,
            user_ids=torch.from_numpy(users),
            seen_ids=None if seen_ids is None else torch.from_numpy(seen_ids),
            seen_lengths=None if seen_lengths is None else torch.from_numpy(seen_lengths),
        )

    def negatives(self, batch_index: int) -> torch.Tensor:
        """The shared negative pool of one batch, the same on every rank: a function of (seed, epoch,
        batch_index) only."""
        if self.num_negatives == 0:
            return torch.zeros(0, dtype=torch.int64)
        rng = np.random.default_rng([self.seed, self.epoch, batch_index])
        return torch.from_numpy(rng.integers(1, self.num_items + 1, size=self.num_negatives, dtype=np.int64))


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The positions [starts[i], ends[i]) of every row, back to back, in one gather index."""
    lengths = ends - starts
    out_offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_offsets, lengths) + np.arange(int(lengths.sum()))


def _already_a_batch(batch: SeqBatch) -> SeqBatch:
    # The dataset returns whole batches; DataLoader's default would try to convert them.
    return batch


def make_dataloader(
    dataset: PreparedDataset,
    split: Split,
    *,
    batch_size: int,
    max_seq_len: int,
    num_negatives: int = 0,
    shuffle: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    exclude_validation_from_train: bool = False,
    seen: SeenItems = SeenItems.WINDOW,
    split_config: SplitConfig | None = None,
    sample_users: int = 0,
) -> DataLoader:
    """One epoch of ``SeqBatch``es for ``rank`` of ``world_size`` (see the module docstring).

    ``shuffle`` defaults to True for train and must stay off (as must negatives) for eval splits.
    ``seen``: under ``SeenItems.HISTORY`` eval batches carry each row's whole history (``SeqBatch.seen``).
    ``split_config``: leave-one-out (None, the default) or temporal (``data.splits``).
    ``sample_users`` > 0: only a fixed random sample (by ``seed``) of that many of the split's users.
    ``len(loader)`` is the number of batches still to come; with ``start_batch=0`` it is the
    epoch's length, the same on every rank.
    """
    split = Split(split)
    train = split is Split.TRAIN
    shuffle = train if shuffle is None else shuffle
    if not train and (shuffle or num_negatives):
        raise ValueError(f"the {split} split is evaluated in order and without negatives")
    split_data = SplitDataset(
        dataset.packed,
        split,
        max_seq_len=max_seq_len,
        num_items=dataset.num_items,
        num_negatives=num_negatives,
        exclude_validation_from_train=exclude_validation_from_train,
        seed=seed,
        epoch=epoch,
        seen=seen,
        split_config=split_config,
        sample_users=sample_users,
    )
    if split_data.skipped:
        log.info("%s %s split: skipped %d users too short for it", dataset.name, split, split_data.skipped)
    if len(split_data) == 0:
        raise ValueError(f"{dataset.name}: no user is long enough for the {split} split")
    sampler = ShardedBatchSampler(
        len(split_data),
        batch_size,
        padding=Padding.WRAP if train else Padding.MASK,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
    )
    return DataLoader(
        split_data,
        batch_size=None,  # the sampler yields whole batches
        sampler=sampler,
        collate_fn=_already_a_batch,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # Without its own generator, every iter() of a DataLoader draws a seed from the global RNG,
        # which shifts the dropout masks of a resumed run against an uninterrupted one.
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
