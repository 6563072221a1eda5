"""Offline analysis beyond HR/NDCG: popularity, coverage, popularity bias, metrics by history length,
metric curves, and the most-popular baseline.

Pure functions on numpy arrays, tensors and DataFrames, so they are checked against hand-computed values
(tests/test_eval_analysis.py) and shared by ``python -m training.evaluate`` and the notebook.

Definitions (all on the test split, leave-one-out):
- popularity: how often an item occurs in the training part of the users' sequences (each sequence
  without its test target, and without its validation target too when the run excluded it from training).
  Ties are broken by the smaller item id, so "the most popular items" is always a well-defined list.
- coverage@K: the share of the catalogue that appears in at least one user's top K.
- popularity bias@K: the share of all top-K slots taken by the 1% most popular items (at least one item).
- most-popular baseline: every user gets the same scores, the items' popularity ranks; the history is
  removed by the same ``evaluate`` code as for a trained model.

Example::

    >>> counts = item_popularity([np.array([1, 2, 2, 4]), np.array([2, 3, 3])], num_items=4)
    >>> counts.tolist()                      # the 4 and the second 3 are test targets; index 0 is padding
    [0, 1, 3, 1, 0]
    >>> popularity_ranking(counts).tolist()  # 1 and 3 tie: the smaller id first
    [2, 1, 3, 4]
    >>> coverage(np.array([[2, 1], [2, 3]]), num_items=4, k=1)
    0.25
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from data.batch import SeqBatch
from data.sequences import UserSequences
from models.metrics import ranking_metrics

POPULAR_SHARE = 0.01
"""The "most popular" items of the popularity-bias metric: this share of the catalogue."""
HISTORY_EDGES = (1, 10, 20, 50, 100, 200, 500)
"""Left edges of the history-length buckets ([1, 10), [10, 20), ..., [500, inf))."""


# --- popularity ------------------------------------------------------------------------------
def item_popularity(sequences: Iterable[np.ndarray], num_items: int, *, drop_last: int = 1) -> np.ndarray:
    """[num_items + 1] int64 counts of each dense item id over the training events.

    Args:
        sequences: every user's full sequence of dense item ids (1..num_items), oldest first.
        drop_last: events at the end of each sequence that training never sees: 1 (the test target),
            or 2 when the run trained with ``exclude_validation_from_train``.
    """
    parts = [np.asarray(s, dtype=np.int64)[: max(len(s) - drop_last, 0)] for s in sequences]
    events = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.bincount(events, minlength=num_items + 1).astype(np.int64)


def packed_item_popularity(packed: UserSequences, num_items: int, train_lengths: np.ndarray, *,
                           chunk_users: int = 1 << 18) -> np.ndarray:
    """``item_popularity`` over packed sequences (possibly memory-mapped): user u's training events are
    the first ``train_lengths[u]`` (clipped to [0, length]) of its sequence. Reads ``chunk_users`` users
    at a time, so memory stays bounded whatever the number of events."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    offsets = np.asarray(packed.offsets)
    lengths = np.clip(np.asarray(train_lengths, dtype=np.int64), 0, np.diff(offsets))
    for lo in range(0, len(packed), chunk_users):
        hi = min(lo + chunk_users, len(packed))
        first, n = offsets[lo], lengths[lo:hi]
        block = np.asarray(packed.items[first : offsets[hi]])
        starts = offsets[lo:hi] - first
        index = np.repeat(starts - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        counts += np.bincount(block[index], minlength=num_items + 1)
    return counts


def popularity_ranking(counts: np.ndarray) -> np.ndarray:
    """Dense item ids 1..num_items, most popular first; equal counts in increasing id order."""
    ids = np.arange(1, len(counts), dtype=np.int64)
    return ids[np.lexsort((ids, -np.asarray(counts)[1:]))]


def popular_items(counts: np.ndarray, share: float = POPULAR_SHARE) -> np.ndarray:
    """The ceil(share * num_items) most popular dense item ids (at least one)."""
    ranking = popularity_ranking(counts)
    return ranking[: max(1, math.ceil(share * len(ranking)))]


def most_popular_scores(counts: np.ndarray) -> torch.Tensor:
    """[num_items + 1] float32 distinct scores in popularity order (num_items for the most popular
    item down to 1; 0 for padding). Distinct, because ``target_ranks`` counts ties in the target's
    favour: raw counts would hand every rarely-seen target a flattering rank among its many ties."""
    scores = torch.zeros(len(counts), dtype=torch.float32)
    ranking = torch.from_numpy(popularity_ranking(counts))
    scores[ranking] = torch.arange(len(ranking), 0, -1, dtype=torch.float32)
    return scores


class MostPopular(nn.Module):
    """The most-popular baseline in the shape ``training.evaluate.evaluate`` expects of a model:
    every user is the vector [1] and every item the vector [its score], so ``encode @ items.T`` gives
    each user the popularity scores, and history removal, ranks and top-K are the same code as for
    a trained model."""

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("scores", most_popular_scores(counts))

    def encode(self, batch: SeqBatch) -> torch.Tensor:
        return self.scores.new_ones(batch.batch_size, 1)

    def embed_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.scores[item_ids.reshape(-1)][:, None]


# --- beyond accuracy -------------------------------------------------------------------------
def coverage(topk: np.ndarray, num_items: int, k: int = 10) -> float:
    """Share of the ``num_items`` catalogue recommended to at least one user in the top ``k``.

    ``topk``: [users, >= k] item ids (dense or raw), best first.
    """
    return len(pd.unique(np.asarray(topk)[:, :k].ravel())) / num_items


def popularity_bias(topk: np.ndarray, popular: np.ndarray, k: int = 10) -> float:
    """Share of the top-``k`` slots (over all users) filled by an item of ``popular``."""
    return float(np.isin(np.asarray(topk)[:, :k], popular).mean())


def popular_share(items: np.ndarray, popular: np.ndarray) -> float:
    """Share of ``items`` (e.g. the test targets) that are in ``popular``: what popularity bias@K
    would be for a recommender whose lists looked like what users actually chose next."""
    return float(np.isin(np.asarray(items), popular).mean())


# --- accuracy breakdowns ---------------------------------------------------------------------
def metric_curves(ranks: np.ndarray | torch.Tensor, ks: Sequence[int]) -> pd.DataFrame:
    """HR@K and NDCG@K for every K of ``ks`` from exact 1-based target ranks: index k, columns hr, ndcg."""
    ks = [int(k) for k in ks]
    m = ranking_metrics(torch.tensor(np.asarray(ranks)), hr_ks=ks, ndcg_ks=ks)
    return pd.DataFrame(
        {"hr": [m[f"hr@{k}"].mean().item() for k in ks], "ndcg": [m[f"ndcg@{k}"].mean().item() for k in ks]},
        index=pd.Index(ks, name="k"),
    )


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """"1-9", "10-19", ..., "500+" for left edges (1, 10, ..., 500)."""
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [f"{edges[-1]}+"]


def metrics_by_history_length(
    ranks: np.ndarray | torch.Tensor,
    history_lengths: np.ndarray | torch.Tensor,
    edges: Sequence[int] = HISTORY_EDGES,
    k: int = 10,
) -> pd.DataFrame:
    """HR@k, NDCG@k and MRR per history-length bucket (empty buckets left out).

    Returns one row per bucket: ``history_length`` (label), ``users``, ``hr@k``, ``ndcg@k``, ``mrr``.
    """
    return history_length_frame(history_length_totals(ranks, history_lengths, edges, k), edges, k)


def history_length_totals(
    ranks: np.ndarray | torch.Tensor,
    history_lengths: np.ndarray | torch.Tensor,
    edges: Sequence[int] = HISTORY_EDGES,
    k: int = 10,
) -> np.ndarray:
    """[len(edges), 4] float64: per history-length bucket the users and their sums of HR@k, NDCG@k and
    MRR. Sums, so that ranks holding different users add theirs up (``history_length_frame`` divides)."""
    per_user = ranking_metrics(torch.tensor(np.asarray(ranks)), hr_ks=(k,), ndcg_ks=(k,))
    bucket = np.searchsorted(np.asarray(edges), np.asarray(history_lengths), side="right") - 1
    inside = bucket >= 0  # shorter than the first edge: in no bucket
    totals = np.zeros((len(edges), 4))
    np.add.at(totals[:, 0], bucket[inside], 1.0)
    for column, name in enumerate((f"hr@{k}", f"ndcg@{k}", "mrr"), start=1):
        np.add.at(totals[:, column], bucket[inside], per_user[name].numpy()[inside])
    return totals


def history_length_frame(totals: np.ndarray, edges: Sequence[int] = HISTORY_EDGES, k: int = 10) -> pd.DataFrame:
    """``metrics_by_history_length``'s table from (possibly all-reduced) ``history_length_totals``."""
    users = totals[:, 0]
    filled = users > 0
    means = totals[filled, 1:] / users[filled, None]
    return pd.DataFrame({
        "history_length": np.asarray(bucket_labels(edges))[filled], "users": users[filled].astype(np.int64),
        f"hr@{k}": means[:, 0], f"ndcg@{k}": means[:, 1], "mrr": means[:, 2],
    })
