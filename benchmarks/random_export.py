"""A random-weight export of any size, written as training writes it: what the serving load
benchmark (``benchmarks/serve.py``) serves without a trained model, and what the serving tests start
their servers on.

Example::

    >>> model, path = make_random_artifact(tmp_path / "export", num_items=50, num_users=10)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.config import ModelConfig
from models.recommender import GenerativeRecommender
from serving.artifact import save_artifact

START_TIME = 978_300_000
"""Timestamps of generated histories start here (MovieLens-1M's first year), one event a minute."""


def raw_item_id(dense: int) -> str:
    """Generated raw ids are not the dense ones, so a mix-up of the two shows in tests."""
    return str(1000 + dense)


def make_random_artifact(
    path: Path,
    *,
    num_items: int = 100,
    num_users: int = 20,
    config: ModelConfig | None = None,
    history_len: tuple[int, int] = (5, 30),
    seed: int = 0,
    titles_as_ids: Sequence[str] | None = None,
) -> tuple[GenerativeRecommender, Path]:
    """A randomly initialised ``GenerativeRecommender`` and its export, written as training writes it.

    Users "0".."num_users-1" get random histories of ``history_len`` (min, max) events. Items have the
    raw ids of ``raw_item_id`` and titles "Item <dense id>", or with ``titles_as_ids`` (``num_items``
    of them) these titles as their raw ids, as the title-keyed ML-1M fallback data has.
    """
    torch.manual_seed(seed)
    config = config or ModelConfig(embedding_dim=16, attention_dim=8, linear_dim=8, max_seq_len=32)
    model = GenerativeRecommender(config, num_items).eval()
    with torch.no_grad():  # the rows as training exports them (the model's d columns, row 0 included)
        table = model.embed_items(torch.arange(num_items + 1), normalize=False)

    rng = np.random.default_rng(seed)
    if titles_as_ids is not None and len(titles_as_ids) != num_items:
        raise ValueError(f"titles_as_ids has {len(titles_as_ids)} titles for {num_items} items")
    raw = ["", *(titles_as_ids or [raw_item_id(i) for i in range(1, num_items + 1)])]  # by dense id
    items = pd.DataFrame({
        "item_id": np.arange(1, num_items + 1),
        "raw_item": raw[1:],
        "title": list(titles_as_ids or [f"Item {i}" for i in range(1, num_items + 1)]),
    })
    lengths = rng.integers(history_len[0], history_len[1] + 1, size=num_users)
    users = pd.DataFrame({
        "user_id": [str(u) for u in range(num_users)],
        "item_ids": [[raw[int(i)] for i in rng.integers(1, num_items + 1, size=n)] for n in lengths],
        "timestamps": [list(START_TIME + 60 * np.arange(n)) for n in lengths],
    })
    save_artifact(
        path,
        model_config=config,
        encoder_state=model.encoder.state_dict(),
        item_embeddings=table,
        items=items,
        users=users,
        metadata={"version": f"random-{num_items}x{config.embedding_dim}-seed{seed}", "metrics": {}},
    )
    return model, path
