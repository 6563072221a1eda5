"""The docstring examples of models/ (and of training.optimizers) run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [*(f"models.{name}" for name in ("config", "embeddings", "hstu", "jagged", "loss", "metrics", "recommender",
                                              "sasrec", "ops.hstu_attention_dense", "ops.per_batch")),
           "training.optimizers"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
