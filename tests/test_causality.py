"""Causality of the whole model: no future event reaches an earlier position.

For every history in a ragged batch (lengths 1..12) a cut t is drawn; every event after t (its item,
timestamp and rating, and the history's target) is replaced. Then, with every optional feature on
(rating embeddings, activation checkpointing, per-position negatives, both attention implementations):
- the user embeddings at positions <= t are unchanged;
- the losses at positions < t are unchanged (position t's label is the event t + 1 itself);
- when only the timestamps and ratings after t change, the losses at positions <= t are unchanged too.
Each check also asserts that positions after t did change, so a perturbation that reached nothing
cannot pass silently.

In-batch negatives are excluded from the loss checks by definition: their pool is the batch's labels,
future items included. The encoder's outputs are causal for them too (the same forward).
"""

from __future__ import annotations

import pytest
import torch

from data.batch import SeqBatch
from models.config import ModelConfig
from models.recommender import GenerativeRecommender

NUM_ITEMS = 40
MAX_LEN = 12
ATOL = 1e-6

ENCODERS = {
    "hstu-pytorch": ModelConfig(embedding_dim=16, attention_dim=8, linear_dim=8, num_heads=2, max_seq_len=MAX_LEN,
                                attention_impl="pytorch"),
    "hstu-triton": ModelConfig(embedding_dim=16, attention_dim=8, linear_dim=8, num_heads=2, max_seq_len=MAX_LEN,
                               attention_impl="triton"),
    "sasrec": ModelConfig.sasrec(embedding_dim=16, ffn_hidden_dim=16, num_heads=2, max_seq_len=MAX_LEN),
}
FEATURES = {"rating_embeddings": True, "activation_checkpointing": True, "negatives_per_position": 8,
            "dropout": 0.0, "attention_dropout": 0.0}


def random_histories(g: torch.Generator, batch_size: int = 6) -> dict[str, list]:
    lengths = [1, MAX_LEN] + torch.randint(1, MAX_LEN + 1, (batch_size - 2,), generator=g).tolist()
    return {
        "items": [torch.randint(1, NUM_ITEMS + 1, (n,), generator=g).tolist() for n in lengths],
        "timestamps": [torch.randint(0, 10**7, (n,), generator=g).sort().values.tolist() for n in lengths],
        "ratings": [(torch.randint(1, 11, (n,), generator=g) / 2).tolist() for n in lengths],
        "targets": torch.randint(1, NUM_ITEMS + 1, (batch_size,), generator=g).tolist(),
    }


def change_future(h: dict[str, list], cuts: list[int], g: torch.Generator, *, items: bool) -> dict[str, list]:
    """A copy of ``h`` whose events after each history's cut are replaced (items and the target only
    when ``items``); timestamps stay sorted so the perturbed history is still a valid one."""
    out = {k: [list(x) if isinstance(x, list) else x for x in v] for k, v in h.items()}
    for b, t in enumerate(cuts):
        n = len(h["items"][b])
        for i in range(t + 1, n):
            out["ratings"][b][i] = 5.5 - h["ratings"][b][i]
            out["timestamps"][b][i] = h["timestamps"][b][i] + int(torch.randint(1, 10**6, (1,), generator=g))
            if items:
                out["items"][b][i] = h["items"][b][i] % NUM_ITEMS + 1
        out["timestamps"][b] = out["timestamps"][b][: t + 1] + sorted(out["timestamps"][b][t + 1:])
        if items:
            out["targets"][b] = h["targets"][b] % NUM_ITEMS + 1
    return out


def run(model: GenerativeRecommender, h: dict[str, list], pool: torch.Tensor):
    batch = SeqBatch.from_sequences(h["items"], h["timestamps"], targets=h["targets"], negatives=pool,
                                    ratings=h["ratings"])
    users = model.encoder(model._history_rows(model.item_embeddings(batch.features)), batch.timestamps,
                          batch.seq_offsets())
    torch.manual_seed(1)  # the per-position negative picks, the same in both runs
    losses, _ = model.position_losses(batch)
    return users.detach(), losses.detach()


def masks(h: dict[str, list], cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([L] position <= cut, [L] position < cut) over the jagged batch."""
    pos = torch.cat([torch.arange(len(s)) for s in h["items"]])
    cut = torch.cat([torch.full((len(s),), t) for s, t in zip(h["items"], cuts, strict=True)])
    return pos <= cut, pos < cut


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_future_events_do_not_reach_earlier_positions(encoder: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = GenerativeRecommender(ENCODERS[encoder].replace(**FEATURES), NUM_ITEMS)
    model.train()  # checkpointing and the training loss path; dropout is 0 so both runs see the same model
    g = torch.Generator().manual_seed(100 + seed)
    h = random_histories(g)
    cuts = [int(torch.randint(0, len(s), (1,), generator=g)) for s in h["items"]]
    cuts[1] = MAX_LEN // 2  # the longest history always has a future to change
    pool = torch.randint(1, NUM_ITEMS + 1, (32,), generator=g)
    past_and_now, past = masks(h, cuts)
    users, losses = run(model, h, pool)

    for items in (True, False):
        changed = change_future(h, cuts, g, items=items)
        users2, losses2 = run(model, changed, pool)
        what = "items, timestamps and ratings" if items else "timestamps and ratings"
        torch.testing.assert_close(users2[past_and_now], users[past_and_now], atol=ATOL, rtol=0,
                                   msg=lambda m, w=what: f"changing future {w} moved an earlier output: {m}")
        kept = past if items else past_and_now  # with the items, position t's own label changed
        torch.testing.assert_close(losses2[kept], losses[kept], atol=ATOL, rtol=0,
                                   msg=lambda m, w=what: f"changing future {w} moved an earlier loss: {m}")
        # The perturbation is real: later positions did change.
        assert (users2[~past_and_now] - users[~past_and_now]).abs().max() > 1e-4
