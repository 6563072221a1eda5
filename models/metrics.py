"""Full-corpus ranking metrics for next-item prediction: HR@K, NDCG@K and MRR.

The target's rank is 1 + the number of candidate items scoring strictly higher than it, where the
candidates are all items except padding row 0 and the user's history (as generative-recommenders,
which removes seen items before ranking). Three deliberate differences from GR:
- Ties count in the target's favour (only strictly greater scores push it down): deterministic, and
  with float scores of trained embeddings ties are rare. A NaN target score ranks last.
- The target itself is always ranked, even if it also occurs in the history (GR would filter it out and
  count a miss). On ML-1M a user rates a movie once, so this never happens there.
- MRR uses the exact rank; GR caps ranks at 2,500 (1/2501 beyond), a < 4e-4 difference per user.

Example::

    >>> scores = torch.tensor([[9.0, 0.1, 0.9, 0.5, 0.7]])      # items 1..4; column 0 is padding
    >>> ranks = target_ranks(scores, torch.tensor([3]), torch.tensor([2]), torch.tensor([1]))
    >>> ranks.tolist()                                          # 4 beats 3; 2 is history, 0 padding
    [2]
    >>> acc = RankingMetrics()
    >>> acc.update(ranks)
    >>> totals = acc.totals()                                   # all_reduce(totals) when distributed
    >>> RankingMetrics.from_totals(totals)["hr@1"], RankingMetrics.from_totals(totals)["mrr"]
    (0.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

HR_KS = (1, 10, 50, 200)
NDCG_KS = (10, 50, 200)


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, history_ids: torch.Tensor, history_lengths: torch.Tensor
) -> torch.Tensor:
    """1-based rank of each target among all items, history and padding removed.

    Args:
        scores: [B, num_items + 1] a score for every item id (column 0 is ignored), e.g. ``score_items``.
        targets: [B] item ids in 1..num_items (rows with an unknown target, 0, should be dropped first).
        history_ids: [L] the histories back to back; history_lengths: [B] (``SeqBatch.lengths``).

    Returns:
        [B] int64 ranks, 1 = best.
    """
    scores = scores.float()
    target_scores = scores.gather(1, targets[:, None])  # read before the history is masked
    rows = torch.repeat_interleave(
        torch.arange(len(targets), device=targets.device), history_lengths, output_size=history_ids.numel()
    )
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[rows, history_ids] = True
    excluded[:, 0] = True
    # A NaN target score ranks last: every other candidate beats it. (NaN compares False, so it would
    # otherwise rank first; a model whose user embeddings went NaN then scored HR@10 ~ 1.)
    beats = (scores > target_scores) | target_scores.isnan()
    row = torch.arange(len(targets), device=targets.device)
    excluded[row, targets] = True  # the target does not beat itself
    return 1 + (beats & ~excluded).sum(dim=1)


def metric_names(hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS) -> list[str]:
    """The metrics' names in ``RankingMetrics.totals()`` order."""
    return [f"hr@{k}" for k in hr_ks] + [f"ndcg@{k}" for k in ndcg_ks] + ["mrr"]


def ranking_metrics(
    ranks: torch.Tensor, hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS
) -> dict[str, torch.Tensor]:
    """Per-example metrics from ranks: ``hr@K`` (rank <= K), ``ndcg@K`` (1/log2(rank + 1) within K;
    one relevant item, so the ideal DCG is 1) and ``mrr`` (1/rank). Each [B] float64."""
    r = ranks.double()
    metrics = {f"hr@{k}": (r <= k).double() for k in hr_ks}
    metrics |= {f"ndcg@{k}": torch.where(r <= k, 1.0 / torch.log2(r + 1), 0.0) for k in ndcg_ks}
    metrics["mrr"] = 1.0 / r
    return metrics


class RankingMetrics:
    """Sums ``ranking_metrics`` over batches.

    The state is one float64 tensor [num_metrics + 1] (the sums, then the count): a distributed caller
    all-reduces (SUM) ``totals()`` and turns it into means with ``from_totals``.
    """

    def __init__(
        self,
        hr_ks: Sequence[int] = HR_KS,
        ndcg_ks: Sequence[int] = NDCG_KS,
        device: torch.device | None = None,
    ) -> None:
        self.hr_ks, self.ndcg_ks = tuple(hr_ks), tuple(ndcg_ks)
        self.names = metric_names(self.hr_ks, self.ndcg_ks)
        self._totals = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)

    def update(self, ranks: torch.Tensor) -> None:
        metrics = ranking_metrics(ranks, self.hr_ks, self.ndcg_ks)
        sums = torch.stack([metrics[name].sum() for name in self.names])
        count = torch.tensor([ranks.numel()], dtype=torch.float64, device=sums.device)
        self._totals += torch.cat([sums, count]).to(self._totals.device)

    def totals(self) -> torch.Tensor:
        """[num_metrics + 1] the running sums and, last, the number of ranks (the live state)."""
        return self._totals

    def compute(self) -> dict[str, float]:
        """Means over everything accumulated here (NaN when empty)."""
        return self.from_totals(self._totals, self.hr_ks, self.ndcg_ks)

    @staticmethod
    def from_totals(
        totals: torch.Tensor, hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS
    ) -> dict[str, float]:
        """Means from (possibly all-reduced) ``totals()`` of accumulators built with the same Ks."""
        names = metric_names(hr_ks, ndcg_ks)
        if totals.numel() != len(names) + 1:
            raise ValueError(f"totals has {totals.numel()} entries; these Ks need {len(names) + 1}")
        *sums, n = totals.tolist()
        return {name: s / n if n else math.nan for name, s in zip(names, sums, strict=True)}
