"""CUDA graphs of the decode step (``models.incremental.decode_padded``: ``HSTU.forward`` over padded
caches, the cached attention as one Triton kernel per block) for fixed (batch, length)
buckets: a step of small kernels is replayed with one launch instead of issued kernel by kernel.

A batch of B states whose longest cache has n tokens runs in the smallest bucket with room for both;
its states are copied into the bucket's static buffers (the other rows are padding, masked out), the
graph is replayed, and the first B rows of its outputs are read back. A step that fits no bucket runs
eagerly. Graphs are captured lazily, the first time a bucket is used. CUDA only.

Example::

    >>> graphs = DecodeGraphs(engine.encoder, engine.item_table)     # on a CUDA engine
    >>> out, keys, values = graphs(items, timestamps, states)         # None when no bucket fits
"""

from __future__ import annotations

import logging

import torch

from models.hstu import HSTU
from models.incremental import PaddedCaches, PrefixState, decode_padded

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
LENGTH_BUCKETS = (32, 64, 128, 256)


class _Graph:
    """One captured bucket: static inputs, the graph, and its static outputs."""

    def __init__(self, encoder: HSTU, item_table: torch.Tensor, batch: int, length: int, pool):
        device = item_table.device
        self.items = torch.zeros(batch, dtype=torch.int64, device=device)
        self.timestamps = torch.zeros(batch, dtype=torch.int64, device=device)
        self.caches = PaddedCaches.allocate(encoder, batch, length, device)
        run = lambda: decode_padded(encoder, item_table, self.items, self.timestamps, self.caches)  # noqa: E731
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs require
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # The capture stream must live on the tensors' device (the worker thread's current device is
        # cuda:0 whatever the model's), else the kernels go elsewhere and the graph captures nothing.
        with torch.cuda.graph(self.graph, pool=pool, stream=torch.cuda.Stream(device)):
            self.out, self.keys, self.values = run()


class DecodeGraphs:
    """Lazily captured CUDA graphs of the decode step, one per (batch, length) bucket."""

    def __init__(self, encoder: HSTU, item_table: torch.Tensor,
                 batch_buckets: tuple[int, ...] = BATCH_BUCKETS, length_buckets: tuple[int, ...] = LENGTH_BUCKETS):
        if item_table.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.encoder, self.item_table = encoder, item_table
        self.max_seq_len = encoder.max_seq_len
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.length_buckets = tuple(sorted({min(n, self.max_seq_len) for n in length_buckets}))
        self._graphs: dict[tuple[int, int], _Graph | None] = {}  # None: its capture failed, run eagerly
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all buckets (replayed in turn)
        self.replays = 0

    def capture(self, max_batch: int) -> int:
        """Captures every bucket up to ``max_batch`` rows now (server warm-up), so no request pays for
        a capture; returns how many graphs exist."""
        limit = next((b for b in self.batch_buckets if b >= max_batch), self.batch_buckets[-1])
        for b in self.batch_buckets:
            if b <= limit:  # every bucket a batch of up to max_batch rows can land in
                for n in self.length_buckets:
                    self._graph((b, n))
        return sum(g is not None for g in self._graphs.values())

    def _graph(self, key: tuple[int, int]) -> _Graph | None:
        if key not in self._graphs:
            try:
                with torch.cuda.device(self.item_table.device):
                    self._graphs[key] = _Graph(self.encoder, self.item_table, *key, self._pool)
            except RuntimeError:
                log.exception("capturing the decode graph for bucket %s failed; that bucket runs eagerly", key)
                self._graphs[key] = None
        return self._graphs[key]

    def bucket(self, batch: int, length: int) -> tuple[int, int] | None:
        b = next((x for x in self.batch_buckets if x >= batch), None)
        n = next((x for x in self.length_buckets if x >= length), None)
        return None if b is None or n is None else (b, n)

    def __call__(self, items: torch.Tensor, timestamps: torch.Tensor, states: list[PrefixState]
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
        """``decode_padded`` of ``states`` through a graph: rows 0..B-1 of its outputs (copies), or None
        when no bucket fits (run eagerly then)."""
        if any(s.length == 0 or s.length >= self.max_seq_len for s in states):
            return None  # not a decode step the graph can take; the eager path says why
        key = self.bucket(len(states), max(s.length for s in states))
        graph = None if key is None else self._graph(key)
        if graph is None:
            return None
        b = len(states)
        graph.items.zero_()
        graph.items[:b] = items
        graph.timestamps[:b] = timestamps
        graph.caches.fill(states)
        with torch.cuda.device(self.item_table.device):
            graph.graph.replay()
        self.replays += 1
        return graph.out[:b].clone(), [k[:b].clone() for k in graph.keys], [v[:b].clone() for v in graph.values]
