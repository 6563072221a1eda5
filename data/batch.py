"""The batch type that flows from the DataLoader through TorchRec's train pipeline into the model.

A batch holds B user sequences back to back (jagged): the item ids live in a ``KeyedJaggedTensor``
(with each history's target and a shared pool of negatives) so TorchRec can shard the embedding
lookup; timestamps, lengths and user ids are plain tensors that
ride along. ``to``/``record_stream``/``pin_memory`` make it ``Pipelineable``, which is what lets
``TrainPipelineSparseDist`` copy batch i+1 to the GPU on a side stream while batch i computes.

Example::

    >>> batch = SeqBatch.from_sequences([[3, 5, 7], [2]], [[10, 20, 30], [5]], targets=[9, 4])
    >>> batch.lengths.tolist(), batch.item_ids().tolist()
    ([3, 1], [3, 5, 7, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

ITEM_FEATURE = "item"
"""KJT key of the users' item histories (jagged, one row per user)."""
TARGET_FEATURE = "target"
"""KJT key of the item that follows each history (exactly one per row; 0 when unknown)."""
NEGATIVE_FEATURE = "negative"
"""KJT key of sampled negative items. Spread evenly over the B rows (may be empty)."""
RATING_FEATURE = "rating"
"""KJT key of each history event's rating bucket (aligned with ITEM_FEATURE; see ``rating_buckets``)."""
FEATURES = (ITEM_FEATURE, TARGET_FEATURE, NEGATIVE_FEATURE, RATING_FEATURE)
"""The first three share the item table, so one sharded lookup embeds histories, targets and negatives;
the ratings have a small table of their own, used when the model asks for it (extra keys are ignored)."""

NUM_RATING_BUCKETS = 11
"""Bucket 0 is "unknown"; 1..10 are ratings 0.5, 1.0, ..., 5.0 stars (MovieLens' half-star steps)."""


def rating_buckets(ratings: torch.Tensor) -> torch.Tensor:
    """Ratings in stars -> int64 bucket ids: round(2 * r) clipped to 0..10; NaN (unknown) -> 0."""
    r = torch.nan_to_num(ratings.double(), nan=0.0)
    return torch.round(2 * r).clamp(0, NUM_RATING_BUCKETS - 1).long()


@dataclass
class SeqBatch(Pipelineable):
    """B jagged user sequences.

    Attributes:
        features: KJT with keys ``FEATURES``: the histories (dense item ids from 1), each
            history's target (one per row, 0 when unknown), a pool of sampled negatives
            shared by the whole batch, and the histories' rating buckets.
        timestamps: [L] int64 seconds, aligned with the history values.
        lengths: [B] int64 history lengths (>= 1).
        user_ids: [B] int64 dense user index (-1 when unknown).
        seen_ids, seen_lengths: evaluation batches under ``SeenItems.HISTORY``: each row's whole
            history before the target (jagged), when it reaches past the window; None otherwise, and
            then the window (``item_ids``) is what the row has seen.
    """

    features: KeyedJaggedTensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    user_ids: torch.Tensor
    seen_ids: torch.Tensor | None = None
    seen_lengths: torch.Tensor | None = None

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_sequences(
        cls,
        items: Sequence[Sequence[int]],
        timestamps: Sequence[Sequence[int]],
        targets: Sequence[int] | None = None,
        user_ids: Sequence[int] | None = None,
        negatives: Sequence[int] | torch.Tensor | None = None,
        ratings: Sequence[Sequence[float]] | None = None,
    ) -> SeqBatch:
        """Builds a batch from Python lists (tests, serving). ``negatives`` is the shared pool;
        ``ratings`` in stars (unknown when None)."""
        if len(items) == 0:
            raise ValueError("a batch needs at least one sequence")
        if len(items) != len(timestamps):
            raise ValueError(f"{len(items)} item sequences but {len(timestamps)} timestamp sequences")
        for i, (seq, ts) in enumerate(zip(items, timestamps, strict=True)):
            if len(seq) == 0:
                raise ValueError(f"sequence {i} is empty; every history needs at least one item")
            if len(seq) != len(ts):
                raise ValueError(f"sequence {i}: {len(seq)} items but {len(ts)} timestamps")
            if ratings is not None and len(ratings[i]) != len(seq):
                raise ValueError(f"sequence {i}: {len(seq)} items but {len(ratings[i])} ratings")
        b = len(items)
        lengths = torch.tensor([len(s) for s in items], dtype=torch.int64)
        values = torch.tensor([x for s in items for x in s], dtype=torch.int64)
        ts = torch.tensor([x for s in timestamps for x in s], dtype=torch.int64)
        neg = torch.as_tensor(negatives if negatives is not None else [], dtype=torch.int64)
        stars = None if ratings is None else torch.tensor([x for s in ratings for x in s], dtype=torch.float64)

        def column(xs: Sequence[int] | None, fill: int) -> torch.Tensor:
            if xs is None:
                return torch.full((b,), fill, dtype=torch.int64)
            return torch.as_tensor(xs, dtype=torch.int64)

        return cls(
            features=make_features(values, lengths, column(targets, 0), neg, stars),
            timestamps=ts,
            lengths=lengths,
            user_ids=column(user_ids, -1),
        )

    # --- views ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    def item_ids(self) -> torch.Tensor:
        """[L] the history item ids, back to back."""
        return self.features[ITEM_FEATURE].values()

    def targets(self) -> torch.Tensor:
        """[B] the item that follows each history (0 when unknown)."""
        return self.features[TARGET_FEATURE].values()

    def rating_buckets(self) -> torch.Tensor:
        """[L] rating bucket of each history event (0 = unknown)."""
        return self.features[RATING_FEATURE].values()

    def negatives(self) -> torch.Tensor:
        """[P] the shared pool of sampled negatives."""
        return self.features[NEGATIVE_FEATURE].values()

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([S] item ids, [B] lengths): what each row has seen (``seen_ids`` or the window)."""
        if self.seen_ids is None or self.seen_lengths is None:
            return self.item_ids(), self.lengths
        return self.seen_ids, self.seen_lengths

    def seq_offsets(self) -> torch.Tensor:
        """[B+1] int64 offsets of each history in the jagged values."""
        return torch.ops.fbgemm.asynchronous_complete_cumsum(self.lengths)

    def sequences(self) -> list[list[int]]:
        """The histories as Python lists (the inverse of ``from_sequences``)."""
        return [s.tolist() for s in torch.split(self.item_ids(), self.lengths.tolist())]

    # --- Pipelineable -----------------------------------------------------------------------
    def to(self, device: torch.device, non_blocking: bool = False) -> SeqBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, non_blocking=non_blocking)

        return SeqBatch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            timestamps=move(self.timestamps),
            lengths=move(self.lengths),
            user_ids=move(self.user_ids),
            seen_ids=move(self.seen_ids),
            seen_lengths=move(self.seen_lengths),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for t in (self.timestamps, self.lengths, self.user_ids, self.seen_ids, self.seen_lengths):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> SeqBatch:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return SeqBatch(
            features=self.features.pin_memory(),
            timestamps=pin(self.timestamps),
            lengths=pin(self.lengths),
            user_ids=pin(self.user_ids),
            seen_ids=pin(self.seen_ids),
            seen_lengths=pin(self.seen_lengths),
        )


def make_features(
    items: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    ratings: torch.Tensor | None = None,
) -> KeyedJaggedTensor:
    """Packs histories, targets, the shared negative pool and the histories' ratings (in stars,
    aligned with ``items``; None = unknown) into one KJT (every key has stride B).

    The pool is spread as evenly as possible over the B rows, because every KJT key needs a length
    per row; which row a negative sits in carries no meaning.
    """
    b = lengths.numel()
    if targets.numel() != b:
        raise ValueError(f"{b} histories but {targets.numel()} targets")
    p = negatives.numel()
    neg_lengths = torch.full((b,), p // b, dtype=torch.int64)
    neg_lengths[: p % b] += 1
    buckets = torch.zeros_like(items) if ratings is None else rating_buckets(ratings)
    if buckets.numel() != items.numel():
        raise ValueError(f"{items.numel()} history items but {buckets.numel()} ratings")
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES),
        values=torch.cat([items, targets, negatives, buckets]),
        lengths=torch.cat([lengths, torch.ones_like(lengths), neg_lengths, lengths]),
    )
