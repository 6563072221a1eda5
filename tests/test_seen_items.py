"""One rule of what a user has seen (``data.splits.SeenItems``), the same in evaluation and in serving.

For the same history, the items that evaluation removes from a user's ranking and recommendation list
(``SeqBatch.seen``, built by the loader) are exactly those the server's request parsing removes
(``Query.exclude``), under both rules; the export carries the run's rule to the server.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.random_export import make_random_artifact
from data.loader import make_dataloader
from data.prepare import PreparedDataset
from data.splits import SeenItems, Split
from data.synthetic import SyntheticConfig, synthetic_interactions
from protos.genrec.v1 import recommender_pb2 as pb
from serving.artifact import load_artifact, save_artifact
from serving.catalogue import Catalogue
from serving.validation import RequestLimits, parse_request

MAX_LEN = 8


@pytest.fixture(scope="module")
def dataset() -> PreparedDataset:
    config = SyntheticConfig(num_users=60, num_items=40, mean_length=20, seed=3)
    return PreparedDataset.from_interactions(synthetic_interactions(config), "synthetic")


def evaluation_seen(dataset: PreparedDataset, rule: SeenItems) -> dict[int, set[int]]:
    """Per dense user: the dense items the test split's evaluation treats as seen."""
    seen: dict[int, set[int]] = {}
    for batch in make_dataloader(dataset, Split.TEST, batch_size=16, max_seq_len=MAX_LEN, seen=rule):
        ids, lengths = batch.seen()
        for user, items in zip(batch.user_ids.tolist(), torch.split(ids, lengths.tolist()), strict=True):
            if user >= 0:
                seen[user] = set(items.tolist())
    return seen


def serving_seen(dataset: PreparedDataset, rule: SeenItems) -> dict[int, set[int]]:
    """Per dense user: the dense items the server excludes for a request carrying the same history."""
    items = dataset.items.sort_values("item_id")
    catalogue = Catalogue(items[["item_id", "raw_item"]].assign(raw_item=items["raw_item"].astype(str)))
    raw = ["", *items["raw_item"].astype(str)]
    limits = RequestLimits(max_seq_len=MAX_LEN, exclude_seen=rule)
    packed = dataset.packed
    seen = {}
    for user in range(len(packed)):
        lo, hi = packed.offsets[user], packed.offsets[user + 1] - 1  # the test target is the last event
        history = [pb.Event(item_id=raw[i], timestamp=int(t))
                   for i, t in zip(packed.items[lo:hi], packed.timestamps[lo:hi], strict=True)]
        query = parse_request(pb.RecommendRequest(history=history, top_k=5), catalogue, limits)
        seen[user] = set(query.exclude.tolist())
    return seen


@pytest.mark.parametrize("rule", list(SeenItems))
def test_evaluation_and_serving_count_the_same_items_as_seen(dataset: PreparedDataset, rule: SeenItems) -> None:
    offline, online = evaluation_seen(dataset, rule), serving_seen(dataset, rule)
    assert offline.keys() <= online.keys() and len(offline) > 50
    for user, items in offline.items():
        assert items == online[user], user
    # Long histories make the two rules differ (else this test could not tell them apart).
    longer = [u for u in offline if dataset.packed.offsets[u + 1] - dataset.packed.offsets[u] - 1 > MAX_LEN]
    assert len(longer) > 10


def test_the_export_carries_the_rule_to_the_server(tmp_path) -> None:
    for rule in SeenItems:
        _, path = make_random_artifact(tmp_path / rule.value, num_items=30, num_users=3)
        art = load_artifact(path)
        assert art.exclude_seen is SeenItems.HISTORY  # the default, and what older exports are read as
        save_artifact(path, model_config=art.model_config, encoder_state=art.encoder_state,
                      item_embeddings=art.item_embeddings, items=art.items, users=art.histories.to_histories(),
                      metadata=art.metadata,
                      exclude_seen=rule)
        assert Catalogue.from_artifact(load_artifact(path)).exclude_seen is rule


def test_window_excludes_only_the_window(dataset: PreparedDataset) -> None:
    window, history = evaluation_seen(dataset, SeenItems.WINDOW), evaluation_seen(dataset, SeenItems.HISTORY)
    assert all(window[u] <= history[u] for u in window)
    assert any(window[u] < history[u] for u in window)
    assert np.mean([len(window[u]) <= MAX_LEN for u in window]) == 1.0
