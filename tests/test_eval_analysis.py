"""training.analysis and the evaluation of hand-made predictions, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from data.batch import SeqBatch
from data.interactions import Interactions
from data.prepare import PreparedDataset
from training import analysis
from training.evaluate import EvalResult, evaluate, predictions_frame


def test_popularity_counts_only_training_events_and_ranks_ties_by_id() -> None:
    sequences = [np.array([3, 1, 3, 2]), np.array([1, 4, 4]), np.array([5, 3])]
    # Test targets 2, 4 and 3 are left out: 3 -> 2, 1 -> 2, 4 -> 1, 5 -> 1, 2 -> 0.
    counts = analysis.item_popularity(sequences, num_items=6)
    assert counts.tolist() == [0, 2, 0, 2, 1, 1, 0]
    # With exclude_validation_from_train also the validation targets (3, 4, 5) are left out.
    assert analysis.item_popularity(sequences, num_items=6, drop_last=2).tolist() == [0, 2, 0, 1, 0, 0, 0]
    assert analysis.popularity_ranking(counts).tolist() == [1, 3, 4, 5, 2, 6]
    assert analysis.popular_items(counts).tolist() == [1]  # 1% of 6 items, at least one
    assert analysis.popular_items(counts, share=0.5).tolist() == [1, 3, 4]
    scores = analysis.most_popular_scores(counts)
    assert scores.tolist() == [0, 6, 2, 5, 4, 3, 1]  # distinct, in popularity order; padding 0


def test_most_popular_through_evaluate_on_hand_made_histories() -> None:
    counts = np.array([0, 2, 0, 2, 1, 1, 0])  # popularity order 1, 3, 4, 5, 2, 6
    batch = SeqBatch.from_sequences(
        [[1, 3], [6], [2, 4, 1]], [[1, 2], [1], [1, 2, 3]], targets=[4, 1, 1], user_ids=[0, 1, 2]
    )
    result = evaluate(analysis.MostPopular(counts), [batch], num_items=6, device=torch.device("cpu"), topk=3)
    # User 0: 1 and 3 are history -> 4 is first. User 1: 1 is first. User 2: target 1 is in its own
    # history but still ranked (first); the list leaves the history out.
    assert result.ranks.tolist() == [1, 1, 1]
    assert result.topk.tolist() == [[4, 5, 2], [1, 3, 4], [3, 5, 6]]
    assert result.metrics["hr@1"] == 1.0 and result.metrics["mrr"] == 1.0

    batch = SeqBatch.from_sequences([[1], [5, 2]], [[1], [1, 2]], targets=[6, 3], user_ids=[0, 1])
    result = evaluate(analysis.MostPopular(counts), [batch], num_items=6, device=torch.device("cpu"))
    # User 0: 6 is behind 3, 4, 5, 2 -> rank 5. User 1: 3 is behind 1 -> rank 2.
    assert result.metrics["hr@1"] == 0.0
    assert result.metrics["hr@10"] == 1.0
    assert result.metrics["ndcg@10"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(3)) / 2)
    assert result.metrics["mrr"] == pytest.approx((1 / 5 + 1 / 2) / 2)


def test_coverage_and_popularity_bias_of_hand_made_lists() -> None:
    topk = np.array([[1, 2, 3], [1, 4, 5], [2, 1, 6]])
    assert analysis.coverage(topk, num_items=10, k=2) == pytest.approx(3 / 10)  # {1, 2, 4}
    assert analysis.coverage(topk, num_items=10, k=3) == pytest.approx(6 / 10)
    assert analysis.popularity_bias(topk, popular=np.array([1]), k=2) == pytest.approx(3 / 6)
    assert analysis.popularity_bias(topk, popular=np.array([1, 2]), k=1) == pytest.approx(3 / 3)
    assert analysis.popular_share(np.array([1, 7, 7, 2]), popular=np.array([1, 2])) == 0.5
    # Raw ids work the same (the notebook reads lists of raw ids).
    assert analysis.coverage(np.array([["a", "b"], ["a", "c"]]), num_items=4, k=2) == 0.75


def test_metric_curves_from_ranks() -> None:
    curves = analysis.metric_curves([1, 3, 12], ks=[1, 10, 20])
    assert curves["hr"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert curves.loc[1, "ndcg"] == pytest.approx(1 / 3)
    assert curves.loc[10, "ndcg"] == pytest.approx((1 + 1 / 2) / 3)  # 1/log2(1+1) + 1/log2(3+1)
    assert curves.loc[20, "ndcg"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(13)) / 3)


def test_metrics_by_history_length_buckets() -> None:
    ranks = [1, 20, 2, 5, 100]
    lengths = [3, 9, 10, 25, 600]
    table = analysis.metrics_by_history_length(ranks, lengths, edges=(1, 10, 50))
    assert table["history_length"].tolist() == ["1-9", "10-49", "50+"]
    assert table["users"].tolist() == [2, 2, 1]
    assert table["hr@10"].tolist() == [0.5, 1.0, 0.0]
    assert table["ndcg@10"].tolist() == pytest.approx([0.5, (1 / math.log2(3) + 1 / math.log2(6)) / 2, 0.0])
    assert table["mrr"].tolist() == pytest.approx([(1 + 1 / 20) / 2, (1 / 2 + 1 / 5) / 2, 1 / 100])
    # Empty buckets are left out.
    assert analysis.metrics_by_history_length([1], [3])["history_length"].tolist() == ["1-9"]


def test_predictions_frame_maps_dense_ids_to_raw_ones_and_adds_history_lengths() -> None:
    frame = pd.DataFrame({
        "user": ["u1", "u1", "u1", "u2", "u2"], "item": [101, 102, 103, 102, 104],
        "timestamp": [1, 2, 3, 1, 2], "rating": [4.0, 4.0, 4.0, 4.0, 4.0],
    })
    dataset = PreparedDataset.from_interactions(Interactions(frame, "hand", None, "0" * 64), "hand")
    assert dataset.raw_users.tolist() == ["u1", "u2"] and dataset.items["raw_item"].tolist() == [101, 102, 103, 104]
    result = EvalResult(
        metrics={}, window_metrics={}, user_ids=torch.tensor([1, 0]),  # out of order: sorted by user on return
        targets=torch.tensor([4, 3]), topk=torch.tensor([[1, 3], [4, 1]]), ranks=torch.tensor([3, 1]),
        target_scores=torch.tensor([0.5, 0.9]), topk_scores=torch.tensor([[0.8, 0.7], [0.9, 0.2]]),
    )
    out = predictions_frame(result, dataset, detailed=True)
    assert out["user_id"].tolist() == ["u1", "u2"]
    assert out["target_item"].tolist() == [103, 104]
    assert out["target_item"].dtype == np.int64  # raw int ids stay ints
    assert [list(t) for t in out["topk"]] == [[104, 101], [101, 103]]
    assert out["rank"].tolist() == [1, 3]
    assert out["history_length"].tolist() == [2, 1]  # test split: all events but the last
    np.testing.assert_allclose(np.stack(out["topk_scores"]), [[0.9, 0.2], [0.8, 0.7]], rtol=1e-6)
    assert out["target_score"].tolist() == pytest.approx([0.9, 0.5])
    # The training-time file: the same first three columns only.
    assert predictions_frame(result, dataset).columns.tolist() == ["user_id", "target_item", "topk"]
