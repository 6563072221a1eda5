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
from dataclasses import dataclass

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


@dataclass
class Ranked:
    """What ``rank_items`` finds for a batch of users."""

    ranks: torch.Tensor
    """[B] the target's 1-based rank with the seen items removed."""
    window_ranks: torch.Tensor
    """[B] with only the window's items removed (equal to ``ranks`` when no window is given)."""
    target_scores: torch.Tensor
    """[B] the target's score."""
    top_scores: torch.Tensor | None = None
    """[B, k] the k best scores, seen items and padding removed (the target kept), best first."""
    top_items: torch.Tensor | None = None
    """[B, k] their item ids."""


def rank_items(
    users: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor],
    window: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    k: int = 0,
    block_scores: int = 1 << 26,
) -> Ranked:
    """``target_ranks`` (and the top ``k``) of users against a whole catalogue, one block of items at a time.

    The scores ``users @ table.T`` are never held for all items at once: each block of at most
    ``block_scores`` scores (256 MiB of float32 by default; 10M items x 128 users would be 5 GiB) is
    masked in place and reduced to counts and a running top k. When the catalogue fits in one block
    (ML-1M: 3,707 x 256) the target's score is its column of that product, so the ranks are
    ``target_ranks``' exactly; across blocks it is the row's dot product, which may differ from its
    column in the last bit (a tie decided the other way).

    Args:
        users: [B, D] user vectors; table: [num_items + 1, D] item vectors, row 0 padding (never ranked).
        targets: [B] item ids in 1..num_items.
        seen: (ids back to back, [B] lengths): items removed from the ranking and the top k.
        window: the same for ``window_ranks``, a subset of ``seen`` (e.g. only the model's window).

    Example::

        >>> users, table = torch.tensor([[1.0]]), torch.tensor([[0.0], [0.1], [0.9], [0.5], [0.7]])
        >>> r = rank_items(users, table, torch.tensor([3]), (torch.tensor([2]), torch.tensor([1])), k=2)
        >>> r.ranks.tolist(), r.top_items.tolist()                  # as target_ranks' example
        ([2], [[4, 3]])
    """
    batch, num_rows = users.shape[0], table.shape[0]
    k = min(k, num_rows - 1)
    width = max(1, block_scores // max(batch, 1))
    row = torch.arange(batch, device=users.device)
    seen_rows = torch.repeat_interleave(row, seen[1], output_size=seen[0].numel())
    window_rows = None if window is None else torch.repeat_interleave(row, window[1], output_size=window[0].numel())
    # Several blocks: the target's score cannot wait for its block, so it is the row's own product.
    target_scores = None if width >= num_rows else (users * table[targets]).sum(1)
    ranks = torch.ones(batch, dtype=torch.int64, device=users.device)
    window_ranks = ranks.clone() if window is not None else ranks
    top_scores = top_items = threshold = None
    for lo in range(0, num_rows, width):
        hi = min(num_rows, lo + width)
        scores = users @ table[lo:hi].T  # [B, hi - lo], ours to overwrite
        if target_scores is None:
            target_scores = scores.gather(1, targets[:, None]).squeeze(1)
        if threshold is None:
            # A NaN target is beaten by every item still ranked: the same as a target scoring -inf, which
            # the masked items (-inf) do not beat. One comparison a block instead of four.
            threshold = target_scores.nan_to_num(nan=-math.inf)[:, None]
        if lo == 0:
            scores[:, 0] = -math.inf
        here = (targets >= lo) & (targets < hi)
        target_at = (row[here], targets[here] - lo)
        if window is not None:
            _mask(scores, window_rows, window[0], lo, hi)
            window_ranks += _beating(scores, threshold, target_at)
        _mask(scores, seen_rows, seen[0], lo, hi)
        ranks += _beating(scores, threshold, target_at)
        if k:
            best = scores.topk(min(k, hi - lo), dim=1)
            values, ids = best.values, best.indices + lo
            if top_scores is not None:
                values, ids = torch.cat([top_scores, values], 1), torch.cat([top_items, ids], 1)
                best = values.topk(min(k, values.shape[1]), dim=1)
                values, ids = best.values, ids.gather(1, best.indices)
            top_scores, top_items = values, ids
    assert target_scores is not None
    return Ranked(ranks, window_ranks, target_scores, top_scores, top_items)


def _mask(scores: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> None:
    inside = (ids >= lo) & (ids < hi)
    scores[rows[inside], ids[inside] - lo] = -math.inf


def _beating(scores: torch.Tensor, threshold: torch.Tensor, target_at: tuple[torch.Tensor, torch.Tensor]):
    """[B] how many of a block's items score above ``threshold`` ([B, 1]: the target's score, -inf for a
    NaN one, so that it is beaten by every item not masked to -inf, as in ``target_ranks``)."""
    beats = scores > threshold
    beats[target_at] = False  # the target does not beat itself
    return beats.sum(1)


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
