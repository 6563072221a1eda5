"""The docstring examples run as written: models/, models/ops, data/, training's config, analysis and
optimizers, serving's work types, appended events and item index. (serving/'s other examples need a trained
export or a running server: they are read, not run.)"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    *(f"models.{name}" for name in ("config", "embeddings", "hstu", "incremental", "jagged", "loss", "metrics",
                                    "recommender", "sasrec")),
    *(f"models.ops.{name}" for name in ("hstu_attention", "hstu_attention_cached", "hstu_attention_dense",
                                        "hstu_attention_triton", "per_batch")),
    *(f"data.{name}" for name in ("batch", "interactions", "loader", "sequences", "splits", "synthetic")),
    *(f"training.{name}" for name in ("analysis", "config", "optimizers")),
    "serving.appended",
    "serving.flags",
    "serving.histories",
    "serving.index",
    "serving.work",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
