"""The export format: round trip, atomic replacement, refusals; and the catalogue built from it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.random_export import make_random_artifact, raw_item_id
from models.config import ModelConfig
from serving.artifact import load_artifact, save_artifact
from serving.catalogue import Catalogue
from serving.histories import HistoryStore, UserHistories


def small_tables(num_items: int = 4):
    items = pd.DataFrame({"item_id": range(1, num_items + 1), "raw_item": [f"m{i}" for i in range(1, num_items + 1)],
                          "title": ["A", None, "C", "D"][:num_items]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "item_ids": [["m1", "m3"], ["m2"]],
                          "timestamps": [[10, 20], [5]]})
    return items, users


def save_small(path, **changes):
    items, users = small_tables()
    kwargs = dict(model_config=ModelConfig(embedding_dim=3), encoder_state={"w": torch.ones(2, 3)},
                  item_embeddings=torch.randn(5, 3), items=items, users=users,
                  metadata={"version": "v1", "metrics": {"ndcg@10": np.float32(0.25)}})
    return save_artifact(path, **{**kwargs, **changes})


def test_round_trip(tmp_path):
    table = torch.randn(5, 3)
    path = save_small(tmp_path / "export", item_embeddings=table)
    art = load_artifact(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "metadata.json", "encoder.pt", "item_embeddings.pt", "items.parquet", "histories"])
    assert torch.equal(art.item_embeddings, table)
    assert torch.equal(art.encoder_state["w"], torch.ones(2, 3))
    assert art.version == "v1" and art.num_items == 4 and art.embedding_dim == 3
    assert art.metadata["metrics"] == {"ndcg@10": 0.25}
    assert ModelConfig(**art.model_config) == ModelConfig(embedding_dim=3)  # enums come back as values
    assert art.items["raw_item"].tolist() == ["m1", "m2", "m3", "m4"]
    items, stamps = art.histories.get("u1")  # memory-mapped, dense ids (m1 -> 1, m3 -> 3)
    assert items.tolist() == [1, 3] and len(stamps) == 2 and art.histories.get("nobody") is None
    assert len(art.histories) == 2


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    save_small(tmp_path / "export", metadata={"version": "old"})
    save_small(tmp_path / "export", metadata={"version": "new"})
    assert load_artifact(tmp_path / "export").version == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failed_write_keeps_the_old_export(tmp_path, monkeypatch):
    save_small(tmp_path / "export", metadata={"version": "old"})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        save_small(tmp_path / "export", metadata={"version": "new"})
    assert load_artifact(tmp_path / "export").version == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"item_embeddings": torch.randn(4, 3)}, "item_id must be 1..3"),
    ({"item_embeddings": torch.full((5, 3), float("nan"))}, "NaN"),
    ({"item_embeddings": torch.randn(5, 4)}, "embedding_dim is 3"),  # e.g. FBGEMM's padded table
    ({"metadata": {"metrics": {}}}, "version"),
    ({"users": pd.DataFrame({"user_id": ["u"], "item_ids": [["zz"]], "timestamps": [[1]]})}, "'zz'"),
    ({"users": pd.DataFrame({"user_id": ["u"], "item_ids": [["m1"]], "timestamps": [[1, 2]]})}, "timestamps"),
])
def test_refuses_inconsistent_exports(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        save_small(tmp_path / "export", **changes)
    assert not (tmp_path / "export").exists()


def test_load_refuses_missing_or_other_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no export"):
        load_artifact(tmp_path / "nothing")
    path = save_small(tmp_path / "export")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_artifact(path)


def test_catalogue_maps_raw_ids_titles_and_histories(tmp_path):
    cat = Catalogue.from_artifact(load_artifact(save_small(tmp_path / "export")))
    assert cat.num_items == 4 and cat.num_users == 2
    assert cat.dense_id("m3") == 3 and cat.dense_id("nope") == 0 and cat.dense_id("") == 0
    assert cat.raw_ids[3] == "m3" and cat.titles[1] == "A" and cat.titles[2] == ""
    history = cat.user_history("u1")
    assert history.items.tolist() == [1, 3] and history.timestamps.tolist() == [10, 20]
    assert cat.user_history("u3") is None


def test_random_artifact_matches_its_model(tmp_path):
    model, path = make_random_artifact(tmp_path / "export", num_items=30, num_users=5)
    art = load_artifact(path)
    assert art.items["raw_item"].iloc[0] == raw_item_id(1)
    ids = torch.arange(1, 31)
    torch.testing.assert_close(torch.nn.functional.normalize(art.item_embeddings[1:], dim=-1, eps=1e-6),
                               model.embed_items(ids))
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(art.encoder_state[name], tensor)


def test_engine_refuses_a_model_it_cannot_serve(tmp_path):
    from serving.engine import Engine

    config = ModelConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=8, rating_embeddings=True)
    _, path = make_random_artifact(tmp_path / "export", num_items=10, num_users=2, config=config)
    with pytest.raises(NotImplementedError, match="rating_embeddings"):
        Engine(load_artifact(path))


def test_history_store_finds_every_user_of_an_unsorted_input(tmp_path):
    """The export's histories on disk (``serving.histories``): sorted by raw id for a binary search,
    each user's events carried with it; unknown, empty and over-long ids are not found; duplicates refused."""
    rng = np.random.default_rng(0)
    n = 2000
    ids = np.array([f"ü{u}" if u % 7 == 0 else str(u * 7919 % 100003) for u in range(n)])  # unique, unsorted
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 6, n))])
    items, stamps = rng.integers(1, 50, offsets[-1]), rng.integers(0, 10**9, offsets[-1])
    store = HistoryStore.write(tmp_path / "h", UserHistories(ids, offsets, items, stamps))
    assert len(store) == n and isinstance(store.items, np.memmap)
    for u in rng.choice(n, 300, replace=False):
        got_items, got_stamps = store.get(str(ids[u]))
        assert got_items.tolist() == items[offsets[u]:offsets[u + 1]].tolist()
        assert got_stamps.tolist() == stamps[offsets[u]:offsets[u + 1]].tolist()
    assert store.get("nobody") is None and store.get("") is None and store.get("9" * 500) is None
    with pytest.raises(ValueError, match="'a' appears twice"):
        HistoryStore.write(tmp_path / "dup", UserHistories(np.array(["a", "b", "a"]), np.arange(4), np.ones(3),
                                                           np.zeros(3)))
