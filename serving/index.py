"""The item index of retrieval: every item scored (exact), or a FAISS shortlist re-scored exactly.

``build_index(item_vectors, IndexConfig(...))`` is built once at server start from the L2-normalised
item vectors the engine scores (``score_items``' right operand, row 0 the padding row, which no
index ever returns). Every kind answers ``search(users, ks, excludes)`` with each user's best ``k``
dense ids and their exact cosine scores, never an excluded id:

- ``exact``: one product with the whole catalogue, the excluded columns masked, top-k (the default;
  what the engine always did).
- ``ivf`` / ``hnsw``: a FAISS inner-product index over the vectors (float32, on the host) proposes a
  shortlist per user: ``shortlist`` ids (default ``max(4 * k, 256)``) plus as many as the user
  excludes, so that k remain once the excluded ones are dropped. The shortlist is then re-scored
  exactly on the vectors' device (gather, dot product) and its top k kept: scores are exact, only
  an item the index did not propose can be missed. A user whose shortlist would span the whole
  catalogue, or whose shortlist came back with fewer than k allowed items, is scored exactly.

Why FAISS: well kept, IVF and HNSW over inner products, and its CPU build installs everywhere from
PyPI. Its GPU build is not on PyPI for CUDA 13, so on a GPU server the shortlist search runs on the
host CPU and only the re-scoring on the device.

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> vectors = torch.nn.functional.normalize(torch.randn(501, 16, generator=g), dim=1)
    >>> index = build_index(vectors, IndexConfig(IndexKind.IVF, nlist=8, nprobe=8))
    >>> [(items, scores)] = index.search(vectors[[7]], ks=[3], excludes=[np.array([7])])
    >>> exact = build_index(vectors, IndexConfig())
    >>> [(want, _)] = exact.search(vectors[[7]], ks=[3], excludes=[np.array([7])])
    >>> items.tolist() == want.tolist() and 7 not in items and 0 not in items
    True
    >>> index.memory_bytes > 500 * 16 * 4        # its own float32 copy of the vectors, plus lists
    True
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import torch

from models.recommender import score_items

log = logging.getLogger(__name__)

Found = tuple[np.ndarray, np.ndarray]
"""One user's answer: dense ids best first (int64) and their cosine scores (float32)."""

ADD_CHUNK = 1 << 20
"""Vectors handed to FAISS at a time: a GPU table is copied to the host a chunk at a time."""


class IndexKind(StrEnum):
    """How retrieval finds a user's best items.

    EXACT: scores the whole catalogue (one matrix product); right for any catalogue a device scores
        fast enough, and the reference the others are measured against.
    IVF: FAISS ``IndexIVFFlat``: the items split into ``nlist`` k-means cells, a user's ``nprobe``
        nearest cells scanned. Builds in minutes at 10M items on 2 cores; memory ~ the vectors.
    HNSW: FAISS ``IndexHNSWFlat``: a proximity graph walked greedily. The fastest search at a given
        recall, but its build is the slowest (hours at 10M items on 2 cores) and it adds ``2 * M``
        neighbour ids per item to the vectors.
    """

    EXACT = "exact"
    IVF = "ivf"
    HNSW = "hnsw"


@dataclass(frozen=True)
class IndexConfig:
    """The index and its knobs (server flags ``--index``, ``--index-*``, ``--hnsw-*``).

    A knob left None takes the default ``resolve`` gives it for the catalogue; a knob of the other
    kind is refused rather than ignored, so a misspelt setup fails at start.

    Attributes:
        kind: the index of retrieval: exact (every item scored), ivf or hnsw (FAISS shortlists, re-scored exactly).
        shortlist: ids proposed per user before exclusions are added; None: ``max(4 * top_k, 256)``
            per request. At least the request's top_k is always proposed.
        nlist: IVF cells; None: the power of two nearest ``sqrt(num_items)``, at most num_items / 39
            (FAISS wants 39 training points per cell).
        nprobe: IVF cells scanned per user; None: ``max(32, nlist // 16)``.
        hnsw_m: HNSW neighbours per node (memory ~ ``2 * M`` int32 per item); None: 32.
        hnsw_ef_search: HNSW search breadth; None: 256. FAISS widens it to the shortlist when larger.
        hnsw_ef_construction: HNSW build breadth; None: 80. Build time grows with it.
        train_points_per_list: the IVF quantizer is trained on at most this many sampled items per
            cell (the build's k-means would otherwise run over the whole catalogue).
        seed: the training sample's and k-means' seed.
    """

    kind: IndexKind = field(default=IndexKind.EXACT, metadata={"flag": "index"})
    shortlist: int | None = field(default=None, metadata={"flag": "index-shortlist"})
    nlist: int | None = field(default=None, metadata={"flag": "index-nlist"})
    nprobe: int | None = field(default=None, metadata={"flag": "index-nprobe"})
    hnsw_m: int | None = None
    hnsw_ef_search: int | None = None
    hnsw_ef_construction: int | None = None
    train_points_per_list: int = field(default=256, metadata={"flag": "index-train-points-per-list"})
    seed: int = field(default=0, metadata={"flag": "index-seed"})

    def check(self, num_items: int | None = None) -> None:
        """Raises ValueError with one line naming the flag when the knobs cannot work (for a catalogue
        of ``num_items`` when given).

        >>> IndexConfig(IndexKind.IVF, nprobe=0).check()
        Traceback (most recent call last):
        ...
        ValueError: --index-nprobe must be >= 1, got 0
        >>> IndexConfig(IndexKind.HNSW, nlist=64).check()
        Traceback (most recent call last):
        ...
        ValueError: --index-nlist applies to --index ivf, not --index hnsw
        """
        kind = IndexKind(self.kind)
        knobs = {"--index-shortlist": (self.shortlist, None), "--index-nlist": (self.nlist, IndexKind.IVF),
                 "--index-nprobe": (self.nprobe, IndexKind.IVF), "--hnsw-m": (self.hnsw_m, IndexKind.HNSW),
                 "--hnsw-ef-search": (self.hnsw_ef_search, IndexKind.HNSW),
                 "--hnsw-ef-construction": (self.hnsw_ef_construction, IndexKind.HNSW)}
        for flag, (value, owner) in knobs.items():
            if value is None:
                continue
            if kind is IndexKind.EXACT:
                raise ValueError(f"{flag} applies to an approximate index (--index ivf or hnsw), not --index exact")
            if owner is not None and owner is not kind:
                raise ValueError(f"{flag} applies to --index {owner}, not --index {kind}")
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.train_points_per_list < 39:
            raise ValueError(f"train_points_per_list must be >= 39 (FAISS' minimum), got {self.train_points_per_list}")
        if kind is IndexKind.IVF and self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"--index-nprobe ({self.nprobe}) must be at most --index-nlist ({self.nlist})")
        if num_items is not None and kind is IndexKind.IVF and self.nlist is not None and self.nlist > num_items:
            raise ValueError(f"--index-nlist ({self.nlist}) must be at most the number of items ({num_items})")

    def resolve(self, num_items: int) -> IndexConfig:
        """This config with every knob of its kind set: the defaults for a catalogue of ``num_items``.

        >>> c = IndexConfig(IndexKind.IVF).resolve(10_000_000)
        >>> c.nlist, c.nprobe
        (4096, 256)
        """
        self.check(num_items)
        kind = IndexKind(self.kind)
        if kind is IndexKind.IVF:
            nlist = self.nlist or max(1, min(2 ** round(math.log2(math.sqrt(num_items))), num_items // 39))
            nprobe = min(self.nprobe or max(32, nlist // 16), nlist)
            return replace(self, kind=kind, nlist=nlist, nprobe=nprobe)
        if kind is IndexKind.HNSW:
            return replace(self, kind=kind, hnsw_m=self.hnsw_m or 32, hnsw_ef_search=self.hnsw_ef_search or 256,
                            hnsw_ef_construction=self.hnsw_ef_construction or 80)
        return replace(self, kind=kind)

    def shortlist_size(self, top_k: int) -> int:
        """Ids proposed for a request of ``top_k`` before its exclusions are added.

        >>> IndexConfig(IndexKind.IVF).shortlist_size(10), IndexConfig(IndexKind.IVF, shortlist=5).shortlist_size(10)
        (256, 10)
        """
        return max(self.shortlist, top_k) if self.shortlist is not None else max(4 * top_k, 256)


class ItemIndex(ABC):
    """Retrieval over a fixed set of item vectors ([num_items + 1, d], L2-normalised, row 0 padding).

    Attributes:
        config: the resolved ``IndexConfig``.
        build_seconds: how long building took.
        memory_bytes: host bytes the index holds beside the item vectors it was built from (0 for exact).
    """

    def __init__(self, item_vectors: torch.Tensor, config: IndexConfig):
        self.item_vectors = item_vectors
        self.num_items = item_vectors.shape[0] - 1
        self.config = config
        self.build_seconds = 0.0
        self.memory_bytes = 0

    @property
    def kind(self) -> IndexKind:
        return self.config.kind

    @abstractmethod
    def search(self, users: torch.Tensor, ks: Sequence[int], excludes: Sequence[np.ndarray]) -> list[Found]:
        """Each user's best ``min(k, num_items - len(exclude))`` items, best first, none of them excluded
        nor the padding row, with exact cosine scores.

        Args:
            users: [B, d] L2-normalised, on the item vectors' device.
            ks: B items wanted.
            excludes: B int64 arrays of unique dense ids (1..num_items) never to return.
        """

    def exact(self, users: torch.Tensor, ks: Sequence[int], excludes: Sequence[np.ndarray]) -> list[Found]:
        """``search`` over the whole catalogue: one product, the excluded columns masked, one top-k and
        one copy to the host for the batch (per-user calls cost a launch and a sync each on a GPU)."""
        rows = np.repeat(np.arange(len(excludes)), [len(e) for e in excludes])
        columns = np.concatenate([np.asarray(e, dtype=np.int64) for e in excludes]) if len(excludes) else rows
        # Copied before the product is launched: a copy from pageable memory waits for the GPU to be idle.
        rows_t, columns_t = torch.from_numpy(np.stack([rows, columns])).to(self.item_vectors.device)
        scores = score_items(users, self.item_vectors)  # [B, num_items + 1], padding column -inf
        scores[rows_t, columns_t] = float("-inf")
        ks = [min(k, self.num_items - len(e)) for k, e in zip(ks, excludes, strict=True)]
        top = torch.topk(scores, max(ks, default=0), dim=1)
        # One copy back for both (float64 holds every item id exactly, as it does the float32 scores).
        values, items = torch.stack([top.values.double(), top.indices.double()]).cpu().numpy()
        return [(items[i, :k].astype(np.int64), values[i, :k].astype(np.float32)) for i, k in enumerate(ks)]


class ExactIndex(ItemIndex):
    """Every item scored for every user: no structure beyond the vectors themselves."""

    def search(self, users: torch.Tensor, ks: Sequence[int], excludes: Sequence[np.ndarray]) -> list[Found]:
        return self.exact(users, ks, excludes)


class FaissIndex(ItemIndex):
    """A FAISS shortlist, re-scored exactly on the item vectors' device (see the module's docstring).

    FAISS holds rows 1..num_items as its ids 0..num_items-1, so the padding row is not in it at all.
    ``threads`` is the OpenMP threads a search may use (the server's ``--torch-threads``: the event
    loop needs a core too). The build runs as FAISS schedules it: on this 2-core CPU its k-means and
    adds kept one core busy.
    """

    def __init__(self, item_vectors: torch.Tensor, config: IndexConfig, threads: int | None = None):
        import faiss  # only an approximate index needs it

        super().__init__(item_vectors, config)
        self._faiss = faiss
        self.threads = threads or faiss.omp_get_max_threads()
        start = time.perf_counter()
        self.index = self._build(faiss)
        self.build_seconds = time.perf_counter() - start
        self.memory_bytes = self._memory()

    def set_search_knobs(self, nprobe: int | None = None, hnsw_ef_search: int | None = None) -> None:
        """Changes the search-time knobs of this index (no rebuild): what a sweep of them measures."""
        self.config = replace(self.config, **{k: v for k, v in (("nprobe", nprobe), ("hnsw_ef_search", hnsw_ef_search))
                                              if v is not None})
        self.config.check(self.num_items)
        if self.config.kind is IndexKind.IVF:
            self.index.nprobe = self.config.nprobe
        else:
            self.index.hnsw.efSearch = self.config.hnsw_ef_search

    def _host_rows(self, start: int, end: int) -> np.ndarray:
        """Item rows ``start..end-1`` (1-based dense ids) as C-contiguous float32 on the host."""
        return np.ascontiguousarray(self.item_vectors[start:end].float().cpu().numpy())

    def _build(self, faiss):
        c, n, d = self.config, self.num_items, self.item_vectors.shape[1]
        if c.kind is IndexKind.IVF:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, c.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = c.seed
            index.cp.max_points_per_centroid = c.train_points_per_list
            # k-means over a sample: its cost is points x nlist x d per iteration, which over 10M
            # items and thousands of cells would take the 2-core machine the better part of an hour.
            sample = min(n, c.train_points_per_list * c.nlist)
            rows = np.sort(np.random.default_rng(c.seed).choice(n, size=sample, replace=False)) + 1
            index.train(np.ascontiguousarray(self.item_vectors[torch.from_numpy(rows).to(self.item_vectors.device)]
                                             .float().cpu().numpy()))
            index.nprobe = c.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = c.hnsw_ef_construction
            index.hnsw.efSearch = c.hnsw_ef_search
        for start in range(1, n + 1, ADD_CHUNK):
            index.add(self._host_rows(start, min(start + ADD_CHUNK, n + 1)))
            if n > ADD_CHUNK:
                log.info("%s index: %d of %d items added", c.kind, min(start + ADD_CHUNK - 1, n), n)
        return index

    def _memory(self) -> int:
        faiss, index, d = self._faiss, self.index, self.item_vectors.shape[1]
        if self.config.kind is IndexKind.IVF:
            lists = index.invlists
            ids = sum(lists.list_size(i) for i in range(index.nlist))
            return ids * (index.code_size + 8) + index.nlist * d * 4  # codes + ids per item, the centroids
        hnsw = index.hnsw
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        return faiss.downcast_index(index.storage).ntotal * d * 4 + graph

    def search(self, users: torch.Tensor, ks: Sequence[int], excludes: Sequence[np.ndarray]) -> list[Found]:
        wanted = [min(k, self.num_items - len(e)) for k, e in zip(ks, excludes, strict=True)]
        sizes = [self.config.shortlist_size(k) + len(e) for k, e in zip(ks, excludes, strict=True)]
        out: list[Found | None] = [None] * len(ks)
        # A shortlist as large as the catalogue is the catalogue: no index can narrow it.
        indexed = [b for b, s in enumerate(sizes) if s < self.num_items and wanted[b] > 0]
        if indexed:
            found = self._rescore(users[indexed], [wanted[b] for b in indexed], [sizes[b] for b in indexed],
                                  [excludes[b] for b in indexed])
            for b, f in zip(indexed, found, strict=True):
                out[b] = f
        # The rest, and users whose shortlist held fewer than k allowed items (an IVF user whose
        # scanned cells are small), are scored exactly, so k come back whenever the catalogue has them.
        short = [b for b in range(len(ks)) if out[b] is None or len(out[b][0]) < wanted[b]]
        if short:
            found = self.exact(users[short], [wanted[b] for b in short], [excludes[b] for b in short])
            for b, f in zip(short, found, strict=True):
                out[b] = f
        return out  # type: ignore[return-value]

    def _rescore(self, users: torch.Tensor, wanted: list[int], sizes: list[int], excludes: Sequence[np.ndarray]
                 ) -> list[Found]:
        """The shortlist of every user in one FAISS call, re-scored in one batched product on the device."""
        self._faiss.omp_set_num_threads(self.threads)  # per call: OpenMP's setting belongs to the calling thread
        queries = np.ascontiguousarray(users.detach().float().cpu().numpy())
        _, ids = self.index.search(queries, max(sizes))  # [B, s]; -1 where fewer were found
        ids += 1  # FAISS id i is dense id i + 1; -1 becomes the padding row 0
        drop = ids == 0
        # Each user keeps its own shortlist length, so its answer does not depend on its batch mates'.
        drop |= np.arange(ids.shape[1])[None, :] >= np.asarray(sizes)[:, None]
        for b, exclude in enumerate(excludes):
            if len(exclude):
                drop[b] |= np.isin(ids[b], exclude)
        device = self.item_vectors.device
        ids_t = torch.from_numpy(ids).to(device)
        scores = torch.bmm(self.item_vectors[ids_t], users.unsqueeze(2)).squeeze(2)  # [B, s] exact cosines
        scores.masked_fill_(torch.from_numpy(drop).to(device), float("-inf"))
        top = torch.topk(scores, min(max(wanted), scores.shape[1]), dim=1)
        items = ids_t.gather(1, top.indices).cpu().numpy()
        values = top.values.float().cpu().numpy()
        out = []
        for b, k in enumerate(wanted):
            keep = np.isfinite(values[b, :k])  # dropped entries sort last: -inf
            out.append((items[b, :k][keep], values[b, :k][keep]))
        return out


def build_index(item_vectors: torch.Tensor, config: IndexConfig, threads: int | None = None) -> ItemIndex:
    """The index ``config`` names over ``item_vectors`` ([num_items + 1, d], L2-normalised, row 0
    padding; kept by reference, not copied); logs the build time and the index's memory.

    ``threads``: OpenMP threads of an approximate index's searches (default: all cores).

    >>> vectors = torch.nn.functional.normalize(torch.randn(101, 8), dim=1)
    >>> build_index(vectors, IndexConfig()).kind
    <IndexKind.EXACT: 'exact'>
    """
    config = config.resolve(item_vectors.shape[0] - 1)
    if config.kind is IndexKind.EXACT:
        return ExactIndex(item_vectors, config)
    index = FaissIndex(item_vectors, config, threads)
    knobs = (f"nlist {config.nlist}, nprobe {config.nprobe}" if config.kind is IndexKind.IVF else
             f"M {config.hnsw_m}, efSearch {config.hnsw_ef_search}, efConstruction {config.hnsw_ef_construction}")
    log.info("built the %s index over %d items (%s) in %.1f s; it holds %.1f MiB beside the item vectors",
             config.kind, index.num_items, knobs, index.build_seconds, index.memory_bytes / 2**20)
    return index
