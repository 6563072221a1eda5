"""Helpers for tests and benchmarks: a random-weight export of any size, a server on a thread, and a
gate that holds its model thread.

Example::

    >>> model, path = make_random_artifact(tmp_path / "export", num_items=50, num_users=10)
    >>> with ServerThread(ServerConfig(artifact=path, port=0, metrics_port=0)) as server:
    ...     channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from models.config import ModelConfig
from models.recommender import GenerativeRecommender
from serving.artifact import save_artifact
from serving.server import RecommenderServer, ServerConfig

T = TypeVar("T")

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


class Gate:
    """Holds every batch at the model thread until ``open``; records the history lengths computed.
    Makes queue-full, deadline and overload cases of a ``ServerThread`` deterministic."""

    def __init__(self, server: ServerThread):
        self.engine = server.server.engine
        self.real = self.engine.compute
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.computed: list[int] = []
        self.engine.compute = self.compute

    def compute(self, queries):
        self.entered.set()
        assert self.opened.wait(20), "the test never opened the gate"
        self.computed.extend(len(q.items) for q in queries)
        return self.real(queries)

    def open(self):
        self.opened.set()


class ServerThread:
    """A ``RecommenderServer`` on its own event loop in a daemon thread, for synchronous callers.

    ``start`` returns once the server is SERVING; ``call`` runs a coroutine on the server's loop
    (e.g. ``server.call(server.server.shutdown())``).
    """

    def __init__(self, config: ServerConfig):
        self.server = RecommenderServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerThread:
        """Starts the loop and the server; with ``wait`` returns once SERVING, else at once (the
        server's start is then ``self.starting``, a concurrent future)."""
        if self._thread.is_alive():
            return self
        self._torch_threads = torch.get_num_threads()  # the server sets its own; restored by stop()
        self._thread.start()
        self.starting = self.submit(self.server.start())
        if wait:
            self.starting.result(timeout=120)
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Starts ``coro`` on the server's loop without waiting; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.server.shutdown(grace_s=5))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            torch.set_num_threads(self._torch_threads)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
