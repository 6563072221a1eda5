"""Evaluation: rank each user's target against all items, as generative-recommenders does.

The user's history items and the padding row are removed from the ranking; HR@{1,10,50,200},
NDCG@{10,50,200} and MRR are summed over users on every rank and all-reduced.

    python -m training.evaluate --run runs/latest     # what `make eval` runs
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from data.batch import SeqBatch
from data.prepare import PreparedDataset
from models.metrics import RankingMetrics, target_ranks
from models.recommender import GenerativeRecommender


@dataclass
class EvalResult:
    metrics: dict[str, float]
    user_ids: torch.Tensor | None = None
    """[U] dense user index of each row of ``topk`` (rank 0 holds all users, others None)."""
    targets: torch.Tensor | None = None
    topk: torch.Tensor | None = None
    """[U, K] dense item ids, best first, history removed."""


@torch.no_grad()
def evaluate(
    model: GenerativeRecommender,
    batches: Iterable[SeqBatch],
    num_items: int,
    device: torch.device,
    *,
    topk: int = 0,
) -> EvalResult:
    """Metrics over all users (every rank must call this together; rows with user_ids < 0 are
    padding that keeps ranks in step and are ignored). With ``topk`` > 0 the K best items of each
    user are gathered on rank 0."""
    was_training = model.training
    model.eval()
    items = model.embed_items(torch.arange(1, num_items + 1, device=device)).float()
    table = torch.cat([items.new_zeros(1, items.shape[1]), items])  # row 0: padding, never ranked
    acc = RankingMetrics(device=device)
    kept_users, kept_targets, kept_topk = [], [], []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        scores = model.encode(batch).float() @ table.T
        keep = batch.user_ids >= 0
        ranks = target_ranks(scores, batch.targets(), batch.item_ids(), batch.lengths)
        acc.update(ranks[keep])
        if topk:
            kept_users.append(batch.user_ids[keep].cpu())
            kept_targets.append(batch.targets()[keep].cpu())
            kept_topk.append(top_items(scores, batch, topk)[keep].cpu())
    totals = acc.totals()
    if dist.is_initialized():
        dist.all_reduce(totals)
    result = EvalResult(RankingMetrics.from_totals(totals))
    if topk:
        result.user_ids, result.targets, result.topk = _gather_rows(
            torch.cat(kept_users), torch.cat(kept_targets), torch.cat(kept_topk)
        )
    model.train(was_training)
    return result


def top_items(scores: torch.Tensor, batch: SeqBatch, k: int) -> torch.Tensor:
    """[B, k] best dense item ids per row, with the padding row and the history removed."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    rows = torch.repeat_interleave(torch.arange(batch.batch_size, device=scores.device), batch.lengths)
    scores[rows, batch.item_ids()] = float("-inf")
    return scores.topk(min(k, scores.shape[1] - 1), dim=1).indices


def _gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensors)
    if dist.get_rank() != 0:
        return (None,) * len(tensors)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(tensors)))


def write_predictions(result: EvalResult, dataset: PreparedDataset, path: Path) -> None:
    """predictions.parquet: raw user id, raw target item, top-K raw item ids (best first)."""
    assert result.topk is not None and result.user_ids is not None and result.targets is not None
    # Lookup arrays indexed by dense id (item 0 is padding and never appears in a list).
    items = dataset.items.sort_values("item_id")
    raw_item = np.concatenate([np.array([None], dtype=object), items["raw_item"].to_numpy(dtype=object)])
    raw_user = dataset.sequences.set_index("user")["raw_user"].sort_index().to_numpy()
    order = torch.argsort(result.user_ids)
    frame = pd.DataFrame({
        "user_id": raw_user[result.user_ids[order].numpy()],
        "target_item": raw_item[result.targets[order].numpy()],
        "topk": list(raw_item[result.topk[order].numpy()]),
    })
    frame.to_parquet(path, index=False)
