"""Index helpers for jagged batches: B sequences stored back to back as [L, ...] with ``seq_offsets`` [B+1].

All of them are plain tensor ops without host syncs (shapes come from ``values``), so they run on any
device and inside fx tracing.

Example::

    >>> offsets = torch.tensor([0, 3, 4])
    >>> positions(offsets, 4).tolist(), last_positions(offsets).tolist()
    ([0, 1, 2, 0], [2, 3])
    >>> next_item_labels(torch.tensor([3, 5, 7, 2]), torch.tensor([9, 4]), offsets).tolist()
    [5, 7, 9, 4]
"""

from __future__ import annotations

import torch


def sequence_index(seq_offsets: torch.Tensor, total: int) -> torch.Tensor:
    """[L] which sequence each of the ``total`` rows belongs to."""
    b = seq_offsets.numel() - 1
    rows = torch.arange(b, device=seq_offsets.device)
    return torch.repeat_interleave(rows, seq_offsets.diff(), output_size=total)


def positions(seq_offsets: torch.Tensor, total: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """[L] each row's index within its own sequence (the oldest item is 0), plus ``first[b]`` ([B]) for
    sequence b's rows when given (rows that follow ``first[b]`` earlier ones)."""
    base = seq_offsets[:-1] if first is None else seq_offsets[:-1] - first
    starts = torch.repeat_interleave(base, seq_offsets.diff(), output_size=total)
    return torch.arange(total, device=seq_offsets.device) - starts


def last_positions(seq_offsets: torch.Tensor) -> torch.Tensor:
    """[B] the row of each sequence's most recent item (sequences must be non-empty)."""
    return seq_offsets[1:] - 1


def next_item_labels(values: torch.Tensor, targets: torch.Tensor, seq_offsets: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the next row of the same sequence, and ``targets[b]`` at the end.

    Works for ids ([L]) and for their embeddings ([L, d]); differentiable in ``values`` and ``targets``.
    """
    return torch.roll(values, -1, dims=0).index_copy(0, last_positions(seq_offsets), targets)


def to_padded(values: torch.Tensor, seq_offsets: torch.Tensor, length: int) -> torch.Tensor:
    """[L, d] -> [B, length, d], each sequence left-aligned, zeros after it."""
    total = values.shape[0]
    out = values.new_zeros(seq_offsets.numel() - 1, length, *values.shape[1:])
    return out.index_put((sequence_index(seq_offsets, total), positions(seq_offsets, total)), values)


def from_padded(padded: torch.Tensor, seq_offsets: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of ``to_padded``: [B, N, d] -> [L, d]."""
    return padded[sequence_index(seq_offsets, total), positions(seq_offsets, total)]
