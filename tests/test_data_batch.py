"""SeqBatch: sequences round-trip through its KJT, and it moves between devices."""

from __future__ import annotations

import pytest
import torch

from data.batch import FEATURES, SeqBatch

ITEMS = [[3, 5, 7], [2], [9, 9, 4, 1]]
TIMESTAMPS = [[10, 20, 30], [5], [1, 2, 2, 8]]


def make() -> SeqBatch:
    return SeqBatch.from_sequences(
        ITEMS, TIMESTAMPS, targets=[8, 6, 2], user_ids=[4, 0, 7], negatives=[11, 12, 13, 14]
    )


def test_round_trip_through_the_kjt() -> None:
    batch = make()
    assert batch.features.keys() == list(FEATURES)
    assert batch.features.stride() == 3
    assert batch.sequences() == ITEMS
    assert batch.item_ids().tolist() == [3, 5, 7, 2, 9, 9, 4, 1]
    assert batch.targets().tolist() == [8, 6, 2]
    assert batch.negatives().tolist() == [11, 12, 13, 14]
    assert batch.features["negative"].lengths().tolist() == [2, 1, 1]  # the pool spread over rows
    assert batch.seq_offsets().tolist() == [0, 3, 4, 8]
    assert [t.tolist() for t in torch.split(batch.timestamps, batch.lengths.tolist())] == TIMESTAMPS
    assert batch.user_ids.tolist() == [4, 0, 7]


def test_defaults_and_validation() -> None:
    batch = SeqBatch.from_sequences([[1], [2, 3]], [[1], [1, 2]])
    assert batch.targets().tolist() == [0, 0] and batch.user_ids.tolist() == [-1, -1]
    assert batch.negatives().numel() == 0
    with pytest.raises(ValueError, match="empty"):
        SeqBatch.from_sequences([[1], []], [[1], []])
    with pytest.raises(ValueError, match="timestamps"):
        SeqBatch.from_sequences([[1, 2]], [[1]])


def test_to_device_keeps_everything() -> None:
    batch = make()
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert moved is not batch
    assert moved.sequences() == ITEMS and moved.negatives().tolist() == [11, 12, 13, 14]
    assert torch.equal(moved.timestamps, batch.timestamps) and torch.equal(moved.user_ids, batch.user_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_copy_to_cuda_and_back() -> None:
    batch = make().pin_memory()
    assert batch.timestamps.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_gpu = batch.to(torch.device("cuda"), non_blocking=True)
    on_gpu.record_stream(torch.cuda.current_stream())
    stream.synchronize()
    assert on_gpu.item_ids().is_cuda and on_gpu.lengths.is_cuda
    assert on_gpu.to(torch.device("cpu")).sequences() == ITEMS
