"""Ranking metrics against hand-computed values: history exclusion, padding, ties, K cut-offs, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import RankingMetrics, rank_items, ranking_metrics, target_ranks


def test_ranks_exclude_history_and_padding_and_count_ties_for_the_target() -> None:
    # Items 1..6; column 0 (padding) scores highest and must be ignored.
    scores = torch.tensor(
        [
            [9.0, 0.5, 0.9, 0.8, 0.1, 0.7, 0.5],  # target 1 (0.5): 2, 3, 5 higher, but 2 and 3 are history;
            #                                       6 ties at 0.5 and does not count -> rank 2 (only 5)
            [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 6, best -> rank 1
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # target 6, worst; history [6, 1]: the target is
            #                                       still ranked, 1 is removed -> 2, 3, 4, 5 -> rank 5
        ]
    )
    targets = torch.tensor([1, 6, 6])
    history = torch.tensor([2, 3, 4, 6, 1])
    lengths = torch.tensor([2, 1, 2])  # [2, 3], [4], [6, 1]

    assert target_ranks(scores, targets, history, lengths).tolist() == [2, 1, 5]


def test_a_nan_target_score_ranks_last() -> None:
    # Items 1..4. Row 0: the target's score is NaN (a diverged model) -> behind all 3 other candidates.
    # Row 1: a NaN elsewhere never beats the target.
    nan = float("nan")
    scores = torch.tensor([[9.0, nan, 0.1, 0.2, 0.3], [9.0, 0.5, nan, 0.1, 0.9]])
    ranks = target_ranks(scores, torch.tensor([1, 1]), torch.tensor([3]), torch.tensor([0, 1]))
    assert ranks.tolist() == [4, 2]  # row 1: item 3 is history, 4 beats the target, 2 (NaN) does not


def test_metric_values_and_cutoffs() -> None:
    ranks = torch.tensor([1, 10, 11, 50, 51, 200, 201])
    m = ranking_metrics(ranks)

    assert m["hr@1"].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert m["hr@50"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert m["hr@200"].tolist() == [1, 1, 1, 1, 1, 1, 0]
    torch.testing.assert_close(m["ndcg@10"], torch.tensor([1.0, 1 / math.log2(11), 0, 0, 0, 0, 0]).double())
    ndcg50 = [1.0, 1 / math.log2(11), 1 / math.log2(12), 1 / math.log2(51), 0, 0, 0]
    torch.testing.assert_close(m["ndcg@50"], torch.tensor(ndcg50).double())
    assert m["ndcg@200"][5].item() == 1 / math.log2(201) and m["ndcg@200"][6].item() == 0
    torch.testing.assert_close(m["mrr"], 1 / ranks.double())


def test_accumulator_streams_batches_and_exposes_reducible_totals() -> None:
    ranks = torch.tensor([1, 3, 12, 60, 250])
    whole = RankingMetrics()
    whole.update(ranks)
    streamed = RankingMetrics()
    streamed.update(ranks[:2])
    streamed.update(ranks[2:])

    assert streamed.totals()[-1].item() == 5
    torch.testing.assert_close(streamed.totals(), whole.totals())
    result = streamed.compute()
    assert set(result) == {"hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"}
    assert result["hr@10"] == 2 / 5
    assert math.isclose(result["mrr"], (1 + 1 / 3 + 1 / 12 + 1 / 60 + 1 / 250) / 5)
    assert math.isclose(result["ndcg@10"], (1 + 1 / math.log2(4)) / 5)

    # What an all_reduce(SUM) over two ranks does: adding totals gives the pooled means.
    other = RankingMetrics()
    other.update(torch.tensor([1]))
    pooled = streamed.totals() + other.totals()
    assert RankingMetrics.from_totals(pooled)["hr@1"] == 2 / 6


def test_empty_is_nan_and_mismatched_totals_are_rejected() -> None:
    assert all(math.isnan(v) for v in RankingMetrics().compute().values())
    with pytest.raises(ValueError, match="Ks"):
        RankingMetrics.from_totals(RankingMetrics(hr_ks=(10,)).totals())


# --- rank_items: target_ranks one block of items at a time ---------------------------------------
def reference_top(scores: torch.Tensor, seen: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """The k best scores per row with padding and the seen items removed, from the whole score matrix."""
    scores = scores.clone()
    scores[:, 0] = -math.inf
    scores[torch.repeat_interleave(torch.arange(len(lengths)), lengths), seen] = -math.inf
    return scores.topk(min(k, scores.shape[1] - 1), dim=1).values


def histories(gen: torch.Generator, batch: int, num_items: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, longest + 1, (batch,), generator=gen)
    return torch.randint(1, num_items + 1, (int(lengths.sum()),), generator=gen), lengths


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_rows", [1, 7, 10_000])
def test_rank_items_equals_target_ranks_over_the_whole_score_matrix(seed: int, block_rows: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    num_items = int(torch.randint(1, 60, (1,), generator=gen))
    users, table = torch.randn(batch, 8, generator=gen), torch.randn(num_items + 1, 8, generator=gen)
    targets = torch.randint(1, num_items + 1, (batch,), generator=gen)
    seen, seen_lengths = histories(gen, batch, num_items, longest=12)  # ragged; some rows empty, repeats
    # The window: each row's seen items' second half, so a subset as in an evaluation batch.
    window_lengths = seen_lengths // 2
    ends = torch.cumsum(seen_lengths, 0)
    window = torch.cat([seen[e - n : e] for e, n in zip(ends.tolist(), window_lengths.tolist(), strict=True)])
    scores = users @ table.T
    k = int(torch.randint(1, num_items + 3, (1,), generator=gen))

    got = rank_items(users, table, targets, (seen, seen_lengths), (window, window_lengths), k=k,
                     block_scores=block_rows * batch)

    assert got.ranks.tolist() == target_ranks(scores, targets, seen, seen_lengths).tolist()
    assert got.window_ranks.tolist() == target_ranks(scores, targets, window, window_lengths).tolist()
    torch.testing.assert_close(got.target_scores, scores.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(got.top_scores, reference_top(scores, seen, seen_lengths, k))
    real = got.top_scores.isfinite()  # beyond the unseen items, masked ones (-inf) fill the list
    torch.testing.assert_close(scores.gather(1, got.top_items)[real], got.top_scores[real])  # the ids' scores
    assert (got.top_items[real] >= 1).all()


@pytest.mark.parametrize("block_rows", [2, 100])
def test_rank_items_ranks_a_nan_target_last_in_any_block(block_rows: int) -> None:
    nan = float("nan")
    users = torch.tensor([[1.0], [1.0]])
    table = torch.tensor([[0.0], [nan], [0.1], [0.2], [0.3]])  # item 1 NaN
    targets = torch.tensor([1, 4])
    got = rank_items(users, table, targets, (torch.tensor([3]), torch.tensor([0, 1])), block_scores=block_rows * 2)
    expected = target_ranks(users @ table.T, targets, torch.tensor([3]), torch.tensor([0, 1]))
    assert got.ranks.tolist() == expected.tolist() == [4, 1]  # row 1: item 3 is seen, NaN item 1 never beats


def test_rank_items_without_a_window_gives_the_same_ranks_twice() -> None:
    users, table = torch.randn(3, 4), torch.randn(20, 4)
    got = rank_items(users, table, torch.tensor([1, 5, 19]), (torch.tensor([2, 2]), torch.tensor([1, 0, 1])))
    assert got.window_ranks is got.ranks and got.top_items is None
