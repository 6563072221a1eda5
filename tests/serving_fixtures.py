"""Serving test helpers: a server on a thread, and a gate that holds its model thread.

Example::

    >>> model, path = make_random_artifact(tmp_path / "export", num_items=50, num_users=10)
    >>> with ServerThread(ServerConfig(artifact=path, port=0, metrics_port=0)) as server:
    ...     channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

(``make_random_artifact`` is ``benchmarks.random_export``'s: the load benchmark serves such exports too.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from serving.server import RecommenderServer, ServerConfig

T = TypeVar("T")


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
    (e.g. ``server.call(server.server.shutdown())``). AppendEvents' store is in memory unless the
    config names a file.
    """

    def __init__(self, config: ServerConfig):
        if config.appended_events is None:  # tests that share an export must not share appended events
            config = dataclasses.replace(config, appended_events=":memory:")
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
