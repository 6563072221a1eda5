"""Ranking metrics against hand-computed values: history exclusion, padding, ties, K cut-offs, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import RankingMetrics, ranking_metrics, target_ranks


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
