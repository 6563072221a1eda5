"""Sampled softmax over a pool of negatives drawn once per batch.

For position i with user embedding u_i, label y_i and negatives n_1..n_P (all L2-normalised):

    loss_i = -log softmax([u_i.e(y_i), u_i.e(n_1), ..., u_i.e(n_P)] / temperature)[0]

with a negative equal to the label (an "accidental hit") masked out, averaged over the positions that
have a label (y_i != 0). All negative logits are one [L, d] x [d, P] matmul. GR draws fresh negatives
per position instead, an [L, N, d] gather (measured at ~4.3 s/step on our CPU). ``per_position=N``
gets GR's objective from the matmul: each position keeps N columns of the pool drawn uniformly with
replacement, so with a pool much larger than N the positions' negatives are nearly independent, as in
GR. Every position scoring one shared pool of 128 has the same expected loss but correlated gradients,
and measured on ML-1M it trains to a clearly worse model (docs/benchmarks.md).

Example::

    >>> items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # rows 0..3
    >>> u = torch.eye(2)                           # two positions, labels 1 and 2
    >>> labels, pool = torch.tensor([1, 2]), torch.tensor([2, 3])  # 2 is a hit for position 1
    >>> loss, n = sampled_softmax_loss(u, labels, items[labels], pool, items[pool], temperature=1.0)
    >>> round(float(loss), 4), int(n)
    (0.6551, 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_loss(
    users: torch.Tensor,
    labels: torch.Tensor,
    label_embeddings: torch.Tensor,
    negative_ids: torch.Tensor,
    negative_embeddings: torch.Tensor,
    temperature: float,
    per_position: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sampled-softmax loss over the labelled positions.

    Args:
        users: [L, d] L2-normalised user embeddings, one per position.
        labels: [L] item id each position should predict; 0 = no label (excluded).
        label_embeddings: [L, d] L2-normalised embeddings of ``labels``.
        negative_ids: [P] the shared pool.
        negative_embeddings: [P, d] L2-normalised embeddings of the pool.
        temperature: logits are cosine similarities divided by this.
        per_position: N > 0: each position uses N columns of the pool drawn at random (with
            replacement; the global torch generator, so a resumed run draws the same ones);
            0: every position uses the whole pool.

    Returns:
        (loss, number of labelled positions); the loss is 0 when there are none.
    """
    losses = sampled_softmax_losses(users, labels, label_embeddings, negative_ids, negative_embeddings,
                                    temperature, per_position)
    count = (labels != 0).sum().to(losses.dtype)
    return losses.sum() / count.clamp(min=1), count


def sampled_softmax_losses(
    users: torch.Tensor,
    labels: torch.Tensor,
    label_embeddings: torch.Tensor,
    negative_ids: torch.Tensor,
    negative_embeddings: torch.Tensor,
    temperature: float,
    per_position: int = 0,
) -> torch.Tensor:
    """[L] the loss of each position (0 where ``labels`` is 0); arguments as ``sampled_softmax_loss``.

    1 / temperature scales the [L, d] users rather than the [L, 1 + P] logits: one pass over the large
    matrix fewer, forward and backward.
    """
    users = users / temperature
    positive = (users * label_embeddings).sum(-1, keepdim=True)  # [L, 1]
    negative = users @ negative_embeddings.T  # [L, P]
    negative_ids = negative_ids[None, :]
    if per_position > 0:
        pick = torch.randint(negative.shape[1], (negative.shape[0], per_position), device=negative.device)
        negative, negative_ids = negative.gather(1, pick), negative_ids[0][pick]  # [L, N]
    negative = negative.masked_fill(labels[:, None] == negative_ids, float("-inf"))
    losses = -F.log_softmax(torch.cat([positive, negative], dim=1), dim=1)[:, 0]
    return losses * (labels != 0).to(losses.dtype)


def in_batch_negatives(
    labels: torch.Tensor, label_embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct non-zero labels and one embedding each: the IN_BATCH pool.

    Each position's own label is in the pool; the loss masks it as an accidental hit.
    """
    keep = labels != 0
    ids, embeddings = labels[keep], label_embeddings[keep]
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full_like(unique, ids.numel()).scatter_reduce(
        0, inverse, torch.arange(ids.numel(), device=ids.device), "amin"
    )
    return unique, embeddings[first]
