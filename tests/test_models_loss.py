"""Sampled softmax: a hand computation, accidental hits, unlabelled positions, in-batch pool, per-position draws."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.loss import in_batch_negatives, sampled_softmax_loss

# Unit vectors of 2-d items, row = item id (row 0 unused).
ITEMS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])


def test_matches_hand_computation_with_accidental_hits_and_unlabelled_positions() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([1, 3, 0])  # the third position has no label
    pool = torch.tensor([3, 4, 3])  # 3 is an accidental hit for position 1 (twice)
    t = 0.5

    loss, count = sampled_softmax_loss(users, labels, ITEMS[labels], pool, ITEMS[pool], temperature=t)

    # position 0: u=(1,0); positive item 1 -> 1.0; negatives 3, 4, 3 -> 0.6, -0.8, 0.6
    p0 = -math.log(math.exp(1.0 / t) / (math.exp(1.0 / t) + 2 * math.exp(0.6 / t) + math.exp(-0.8 / t)))
    # position 1: u=(0,1); positive item 3 -> 0.8; negative 4 -> 0.6 (both 3s masked)
    p1 = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(0.6 / t)))
    assert count.item() == 2
    assert math.isclose(loss.item(), (p0 + p1) / 2, rel_tol=1e-6)


def test_gradients_are_finite_when_every_negative_is_a_hit() -> None:
    users = torch.tensor([[0.6, 0.8]], requires_grad=True)
    labels = torch.tensor([3])
    loss, _ = sampled_softmax_loss(users, labels, ITEMS[labels], torch.tensor([3, 3]), ITEMS[[3, 3]], 0.05)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(users.grad).all()


def test_no_labels_gives_zero_loss() -> None:
    labels, pool = torch.tensor([0]), torch.tensor([2])
    loss, count = sampled_softmax_loss(ITEMS[[1]], labels, ITEMS[[1]], pool, ITEMS[pool], 1.0)
    assert loss.item() == 0.0 and count.item() == 0


def test_shared_pool_equals_per_position_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(7, 4, generator=g), dim=-1)
    table = F.normalize(torch.randn(10, 4, generator=g), dim=-1)
    labels = torch.randint(1, 10, (7,), generator=g)
    labels[2] = 0
    pool = torch.randint(1, 10, (5,), generator=g)

    loss, _ = sampled_softmax_loss(users, labels, table[labels], pool, table[pool], 0.1)

    terms = []
    for u, y in zip(users, labels.tolist(), strict=True):
        if y == 0:
            continue
        negatives = [table[n] for n in pool.tolist() if n != y]
        logits = torch.stack([u @ table[y]] + [u @ e for e in negatives]) / 0.1
        terms.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_in_batch_pool_is_distinct_nonzero_labels_with_their_embeddings() -> None:
    labels = torch.tensor([4, 0, 2, 4, 1, 2])
    embeddings = ITEMS[labels]
    ids, pool = in_batch_negatives(labels, embeddings)
    assert ids.tolist() == [1, 2, 4]
    torch.testing.assert_close(pool, ITEMS[[1, 2, 4]])


def test_per_position_negatives_are_columns_of_the_pool_drawn_for_each_position() -> None:
    g = torch.Generator().manual_seed(1)
    users = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    table = F.normalize(torch.randn(9, 4, generator=g), dim=-1)
    labels = torch.randint(1, 9, (6,), generator=g)
    labels[4] = 0
    pool = torch.randint(1, 9, (20,), generator=g)
    t, n = 0.1, 3

    torch.manual_seed(123)
    loss, count = sampled_softmax_loss(users, labels, table[labels], pool, table[pool], t, per_position=n)
    torch.manual_seed(123)
    pick = torch.randint(pool.numel(), (6, n))  # the draw the loss made: one row of columns per position

    terms = []
    for i, y in enumerate(labels.tolist()):
        if y == 0:
            continue
        negatives = [j for j in pool[pick[i]].tolist() if j != y]  # accidental hits masked
        logits = torch.stack([users[i] @ table[y]] + [users[i] @ table[j] for j in negatives]) / t
        terms.append(-F.log_softmax(logits, dim=0)[0])
    assert count.item() == 5
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-5)
    # A different draw gives a different loss: the positions really do get their own negatives.
    other, _ = sampled_softmax_loss(users, labels, table[labels], pool, table[pool], t, per_position=n)
    assert not torch.allclose(loss, other)
