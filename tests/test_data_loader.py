"""The DataLoader: equal batch counts per rank, N ranks = one process, exact resume, negatives, contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.batch import FEATURES, SeqBatch
from data.loader import PADDING_USER, Padding, ShardedBatchSampler, make_dataloader
from data.prepare import PreparedDataset
from data.splits import Split, split_sequence
from data.synthetic import SyntheticConfig, synthetic_interactions


@pytest.fixture(scope="module")
def dataset() -> PreparedDataset:
    # ~300 users with lengths from 2 to ~200: some too short for train/valid, some longer than max_seq_len.
    config = SyntheticConfig(num_users=301, num_items=400, mean_length=15, seed=7)
    return PreparedDataset.from_interactions(synthetic_interactions(config), "synthetic")


def batches(dataset: PreparedDataset, split: Split, **kwargs: object) -> list[SeqBatch]:
    args = {"batch_size": 32, "max_seq_len": 20, "num_negatives": 50 if split is Split.TRAIN else 0} | kwargs
    return list(make_dataloader(dataset, split, **args))  # type: ignore[arg-type]


def assert_same(a: list[SeqBatch], b: list[SeqBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in FEATURES:
            assert torch.equal(x.features[key].values(), y.features[key].values())
            assert torch.equal(x.features[key].lengths(), y.features[key].lengths())
        for name in ("timestamps", "lengths", "user_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name))


@pytest.mark.parametrize(
    ("num_rows", "batch_size", "world_size"), [(10, 3, 4), (97, 8, 3), (64, 8, 8), (5, 32, 2)]
)
def test_sampler_equal_counts_and_the_global_batch_of_one_process(
    num_rows: int, batch_size: int, world_size: int
) -> None:
    for padding in Padding:
        plans = [
            list(ShardedBatchSampler(num_rows, batch_size, padding=padding, shuffle=True, seed=1,
                                     rank=r, world_size=world_size))
            for r in range(world_size)
        ]  # fmt: skip
        assert len({len(p) for p in plans}) == 1  # same number of batches on every rank
        assert all(len(plan.rows) == batch_size for p in plans for plan in p)  # and full batches
        shards = [{int(i) for plan in p for i in plan.rows if i >= 0} for p in plans]
        assert set().union(*shards) == set(range(num_rows))  # nobody left out
        if padding is Padding.MASK:
            real = [int(i) for p in plans for plan in p for i in plan.rows if i >= 0]
            assert len(real) == num_rows  # eval: each exactly once
            for p in plans:  # padding only at the end of a rank's epoch
                rows = np.concatenate([plan.rows for plan in p])
                assert (rows[: (rows >= 0).sum()] >= 0).all()
        else:  # train: batch k of all ranks = batch k of one process with the global batch size
            one = list(ShardedBatchSampler(num_rows, batch_size * world_size, padding=padding, shuffle=True,
                                           seed=1))
            assert len(one) == len(plans[0])
            for k, plan in enumerate(one):
                together = np.concatenate([p[k].rows for p in plans])
                assert sorted(together.tolist()) == sorted(plan.rows.tolist()), k


def test_train_loader_ranks_together_are_one_process(dataset: PreparedDataset) -> None:
    per_rank = [batches(dataset, Split.TRAIN, rank=r, world_size=3, epoch=2) for r in range(3)]
    one = batches(dataset, Split.TRAIN, batch_size=96, epoch=2)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(one)
    for k, batch in enumerate(one):
        users = torch.cat([bs[k].user_ids for bs in per_rank])
        assert sorted(users.tolist()) == sorted(batch.user_ids.tolist())
        for bs in per_rank:  # the same negative pool on every rank as in the one process
            assert torch.equal(bs[k].negatives(), batch.negatives())
    too_short = int((dataset.packed.lengths < 3).sum())
    assert len(set(torch.cat([b.user_ids for b in one]).tolist())) == dataset.num_users - too_short


def test_resume_reproduces_the_rest_of_the_epoch(dataset: PreparedDataset) -> None:
    full = batches(dataset, Split.TRAIN, rank=1, world_size=2, epoch=5, seed=11)
    resumed = batches(dataset, Split.TRAIN, rank=1, world_size=2, epoch=5, seed=11, start_batch=2)
    assert len(full) > 3
    assert_same(full[2:], resumed)
    assert batches(dataset, Split.TRAIN, rank=1, world_size=2, epoch=5, seed=11, start_batch=len(full)) == []
    with pytest.raises(ValueError, match="start_batch"):
        batches(dataset, Split.TRAIN, rank=1, world_size=2, start_batch=len(full) + 1)


def test_shuffle_and_negatives_follow_seed_and_epoch(dataset: PreparedDataset) -> None:
    a = batches(dataset, Split.TRAIN, epoch=0)
    assert_same(a, batches(dataset, Split.TRAIN, epoch=0))
    b = batches(dataset, Split.TRAIN, epoch=1)
    assert not torch.equal(a[0].user_ids, b[0].user_ids)
    assert not torch.equal(a[0].negatives(), b[0].negatives())
    r0, r1 = (batches(dataset, Split.TRAIN, rank=r, world_size=2) for r in (0, 1))
    assert not torch.equal(r0[0].user_ids, r1[0].user_ids)
    unshuffled = batches(dataset, Split.TRAIN, shuffle=False)
    assert unshuffled[0].user_ids.tolist() == sorted(unshuffled[0].user_ids.tolist())


def test_negatives_in_range_and_shared_pool(dataset: PreparedDataset) -> None:
    pool = torch.cat([b.negatives() for b in batches(dataset, Split.TRAIN, num_negatives=77)])
    assert pool.numel() == 77 * len(batches(dataset, Split.TRAIN))
    assert pool.min() >= 1 and pool.max() <= dataset.num_items
    assert pool.unique().numel() > 0.5 * dataset.num_items  # uniform, not a handful of ids
    batch = batches(dataset, Split.TRAIN, num_negatives=77)[0]
    assert batch.features["negative"].lengths().sum() == 77  # spread over the rows of one KJT key


def test_batches_hold_the_split_histories(dataset: PreparedDataset) -> None:
    for split in Split:
        for batch in batches(dataset, split, max_seq_len=20, shuffle=split is Split.TRAIN):
            histories, targets = batch.sequences(), batch.targets().tolist()
            ts = torch.split(batch.timestamps, batch.lengths.tolist())
            for row, user in enumerate(batch.user_ids.tolist()):
                if user == PADDING_USER:
                    assert histories[row] == [0] and targets[row] == 0
                    continue
                events = list(zip(*(a.tolist() for a in dataset.packed[user]), strict=True))
                history, (target, _) = split_sequence(events, split, 20)
                assert histories[row] == [item for item, _ in history] and targets[row] == target
                assert ts[row].tolist() == [t for _, t in history]


def test_eval_covers_each_user_once_with_padding(dataset: PreparedDataset) -> None:
    per_rank = [batches(dataset, Split.TEST, batch_size=50, rank=r, world_size=4) for r in range(4)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(b.batch_size == 50 for bs in per_rank for b in bs)
    ids = torch.cat([b.user_ids for bs in per_rank for b in bs])
    real = ids[ids != PADDING_USER]
    assert sorted(real.tolist()) == list(range(dataset.num_users))  # every user has >= 2 events
    assert all(b.negatives().numel() == 0 for bs in per_rank for b in bs)
    with pytest.raises(ValueError, match="in order and without negatives"):
        make_dataloader(dataset, Split.TEST, batch_size=8, max_seq_len=5, shuffle=True)
    with pytest.raises(ValueError, match="in order and without negatives"):
        make_dataloader(dataset, Split.VALID, batch_size=8, max_seq_len=5, num_negatives=3)


def test_workers_give_the_same_batches(dataset: PreparedDataset) -> None:
    assert_same(batches(dataset, Split.TRAIN, num_workers=1), batches(dataset, Split.TRAIN))


def test_sampled_validation_users_are_a_fixed_subset_on_any_number_of_ranks(dataset: PreparedDataset) -> None:
    def users(world_size: int, **kwargs: object) -> list[int]:
        return sorted(u for rank in range(world_size)
                      for b in make_dataloader(dataset, Split.VALID, batch_size=8, max_seq_len=10, rank=rank,
                                               world_size=world_size, **kwargs)
                      for u in b.user_ids.tolist() if u >= 0)

    everyone = users(1)
    sample = users(1, sample_users=25, seed=7)
    assert len(sample) == 25 == len(set(sample)) and set(sample) < set(everyone)
    assert users(1, sample_users=25, seed=7, epoch=3) == sample  # every epoch validates the same users
    assert users(3, sample_users=25, seed=7) == sample  # and so does any number of ranks
    assert users(1, sample_users=25, seed=8) != sample
    assert users(1, sample_users=10**6) == everyone  # more than there are: all of them
