"""The docstring examples of models/ run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["config", "embeddings", "hstu", "jagged", "loss", "metrics", "recommender", "sasrec"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"models.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
