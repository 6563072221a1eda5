"""SeqBatch: sequences round-trip through its KJT, and it moves between devices."""

from __future__ import annotations

import pytest
import torch

from data.batch import FEATURES, SeqBatch, rating_buckets

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


def test_ratings_ride_along_as_buckets() -> None:
    batch = SeqBatch.from_sequences([[3, 5], [2]], [[1, 2], [3]], targets=[9, 4], ratings=[[0.5, 5.0], [float("nan")]])
    assert batch.rating_buckets().tolist() == [1, 10, 0]  # half stars; NaN is "unknown"
    assert SeqBatch.from_sequences([[3]], [[1]]).rating_buckets().tolist() == [0]
    with pytest.raises(ValueError, match="ratings"):
        SeqBatch.from_sequences([[3, 5]], [[1, 2]], ratings=[[4.0]])


def test_loader_ratings_match_the_events() -> None:
    from data.loader import make_dataloader
    from data.prepare import PreparedDataset
    from data.splits import Split
    from data.synthetic import synthetic_interactions

    dataset = PreparedDataset.from_interactions(synthetic_interactions(), "synthetic")
    batch = next(iter(make_dataloader(dataset, Split.TEST, batch_size=16, max_seq_len=10)))
    frame = dataset.sequences
    expected = []
    for user, length in zip(batch.user_ids.tolist(), batch.lengths.tolist(), strict=True):
        n = len(frame.loc[user, "ratings"])
        expected += rating_buckets(torch.from_numpy(frame.loc[user, "ratings"][n - 1 - length : n - 1])).tolist()
    assert batch.rating_buckets().tolist() == expected
