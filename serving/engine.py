"""The model side of serving: an export's encoder and item table, run on batches of validated queries.

The forward pass is ``models.recommender.encode_histories`` + ``score_items``, the functions the
offline evaluation uses, on the exported (unnormalised) item rows, so served scores equal offline
ones. Retrieval goes through the item index (``serving.index``): by default it scores the whole
catalogue with one matrix product and masks the padding row, the history and ``exclude`` before
top-k; an approximate index re-scores a FAISS shortlist exactly. Ranking mode scores the candidates
alone.

Example::

    >>> engine = Engine(load_artifact("runs/latest/export"))
    >>> engine.warm_up(max_batch_size=32)
    >>> [rec] = engine.compute([query])       # a serving.work.Query (the server parses one from a request)
    >>> rec.items[:3], rec.scores[:3]         # dense ids, best first; cosine similarities
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from models.config import EncoderType, ModelConfig
from models.embeddings import l2_normalize
from models.incremental import PrefixState, append_decoded, extend, extend_candidates, extend_one_each
from models.ops.hstu_attention import tuning_lengths
from models.recommender import build_encoder, encode_histories, score_items
from serving.artifact import Artifact
from serving.index import IndexConfig, build_index
from serving.kv_cache import KVCache
from serving.work import (
    Beam,
    BeamStep,
    Continue,
    Decode,
    Decoded,
    Prefill,
    Prefilled,
    Query,
    Recommendation,
    Score,
    Work,
)

log = logging.getLogger(__name__)


def sample_softmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """An index drawn from softmax(``logits``) by the exponential race: argmax(logits - log E) with
    E ~ Exp(1) per entry is distributed exactly as the softmax, so nothing is normalised and the
    catalogue never leaves the device (``generator`` must live on ``logits``' device). Entries of -inf
    are never drawn.

    The race's times are drawn in float64: from float32 uniforms (24 bits) a time of exactly 0, which
    wins whatever its logit, would come up for one item in 2**24, about every other draw over 10M
    items, and -log E would be capped near 16.6 where the largest of 10M races reaches ~16.1.

    Example::

        >>> logits = torch.tensor([0.0, float("-inf"), 2.0])
        >>> sample_softmax(logits, torch.Generator().manual_seed(0)) in (0, 2)
        True
    """
    race = torch.empty_like(logits, dtype=torch.float64).exponential_(generator=generator)
    keys = logits - race.log().to(logits.dtype)
    return int(torch.argmax(keys.masked_fill(logits == float("-inf"), float("-inf"))))


class Engine:
    """Holds the encoder and the item vectors; ``compute`` is called from one thread at a time.

    ``kv_cache_bytes`` > 0 keeps per-user keys/values (HSTU only) for ``Prefill`` work items.
    ``cuda_graphs`` replays decode steps, and one-event Prefills of cached users, as CUDA graphs
    (``serving.cuda_graphs``; CUDA and HSTU only). ``index`` is the item index of retrieval
    (``serving.index``; exact by default); Generate's sampling and beam search score the whole
    catalogue whatever it is.
    """

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu", kv_cache_bytes: int = 0,
                 metrics=None, cuda_graphs: bool = False, index: IndexConfig | None = None):
        self.device = torch.device(device)
        self.config = ModelConfig(**artifact.model_config)
        if getattr(self.config, "rating_embeddings", False):
            # The export holds no rating table and the API no per-event rating yet.
            raise NotImplementedError("this server cannot serve a model trained with rating_embeddings=True")
        self.version = artifact.version
        self.num_items = artifact.num_items
        self.encoder = build_encoder(self.config, self.device)
        self.encoder.load_state_dict(artifact.encoder_state)
        self.encoder.eval()  # no dropout; serving must be deterministic
        self.item_table = artifact.item_embeddings.to(self.device)
        self.incremental = self.config.encoder is EncoderType.HSTU
        self.cache = KVCache(kv_cache_bytes, metrics) if kv_cache_bytes > 0 and self.incremental else None
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and self.incremental:
            from serving.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.encoder, self.item_table)
        # Normalised once here rather than per batch: it is the right operand of every score.
        self.item_vectors = l2_normalize(self.item_table, self.config.l2_norm_eps)
        # FAISS searches with as many threads as the model (--torch-threads): torch and FAISS each have
        # an OpenMP runtime, whose idle threads spin; more of them than free cores cost 8-16 ms a request.
        self.index = build_index(self.item_vectors, index or IndexConfig(), threads=torch.get_num_threads())

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @torch.inference_mode()
    def compute(self, work: Sequence[Work]) -> list:
        """One model step over a mix of work items; results in the same order.

        Querys: one encoder call over their full histories and one matrix product. Prefills: each
        extends its user's prefix state by up to its budget. Scores and Decodes: one matrix product
        for all of them.
        """
        results: list = [None] * len(work)
        kinds: dict[type, list[int]] = {}
        for i, item in enumerate(work):
            kinds.setdefault(type(item), []).append(i)
        handlers = {Query: self._queries, Prefill: self._prefills, Score: self._scores, Decode: self._decodes,
                    BeamStep: self._beam_steps}
        for kind, index in kinds.items():
            if kind not in handlers:
                raise TypeError(f"unknown work item {kind.__name__}")
            for i, result in zip(index, handlers[kind]([work[i] for i in index]), strict=True):
                results[i] = result
        return results

    def _queries(self, queries: Sequence[Query]) -> list[Recommendation]:
        lengths = [len(q.items) for q in queries]
        offsets = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int64, device=self.device)
        ids, stamps = torch.from_numpy(np.stack([np.concatenate([q.items for q in queries]),
                                                 np.concatenate([q.timestamps for q in queries])])).to(self.device)
        users = encode_histories(self.encoder, self.item_table, ids, stamps, offsets)
        return self._top_k(users, queries, lengths)

    def _top_k(self, users: torch.Tensor, queries: Sequence[Query], lengths: Sequence[int]) -> list[Recommendation]:
        """Retrieval queries: through the item index (``serving.index``: exact by default), all of the
        batch's in one call. Ranking queries: their candidates' exact scores, one query at a time (the
        index is never consulted: the candidates are the shortlist)."""
        out: list[Recommendation | None] = [None] * len(queries)
        retrieval = [b for b, q in enumerate(queries) if q.candidates is None]
        if retrieval:
            rows = users if len(retrieval) == len(queries) else users[retrieval]
            found = self.index.search(rows, [queries[b].top_k for b in retrieval],
                                      [queries[b].exclude for b in retrieval])
            for b, (items, values) in zip(retrieval, found, strict=True):
                out[b] = Recommendation(items, values, lengths[b])
        for b, q in enumerate(queries):
            if q.candidates is not None:
                candidates = torch.from_numpy(q.candidates).to(self.device)
                scores = self.item_vectors[candidates] @ users[b]  # the candidates' columns of score_items
                top = torch.topk(scores, min(q.top_k, len(candidates)))
                out[b] = Recommendation(candidates[top.indices].cpu().numpy(), top.values.float().cpu().numpy(),
                                        lengths[b])
        return out  # type: ignore[return-value]

    # --- the KV-cache path ----------------------------------------------------------------------
    def _prefills(self, prefills: Sequence[Prefill]) -> list[Prefilled | Continue]:
        starts = [self._resume(p) for p in prefills]
        extended = self._one_event_graphed(prefills, starts)
        out: list[Prefilled | Continue] = []
        for i, (p, state) in enumerate(zip(prefills, starts, strict=True)):
            done = self._prefill(p, state, extended.get(i))
            out.append(Continue(replace(p, state=done.state)) if p.chain and done.remaining else done)
        return out

    def _resume(self, p: Prefill) -> PrefixState | None:
        """The state ``p`` continues from: its own, else the user's cached prefix, else none."""
        if not self.incremental:
            raise NotImplementedError("prefix states need an HSTU model")
        if p.budget < 1:
            raise ValueError(f"a Prefill needs a budget >= 1, got {p.budget}")
        if p.state is None and p.key is not None and self.cache is not None:
            return self.cache.lookup(p.key, p.items, p.timestamps)
        return p.state

    def _one_event_graphed(self, prefills: Sequence[Prefill], starts: Sequence[PrefixState | None]
                           ) -> dict[int, PrefixState]:
        """A known user's one new event is a decode step over the cached prefix: with CUDA graphs, all
        such Prefills of the batch are replayed as one. Returns their extended states by position."""
        if self.graphs is None:
            return {}
        one = [i for i, (p, st) in enumerate(zip(prefills, starts, strict=True))
               if st is not None and len(p.items) - st.length == 1 and 0 < st.length < self.max_seq_len]
        if not one:
            return {}
        ids = torch.tensor([int(prefills[i].items[-1]) for i in one], dtype=torch.int64, device=self.device)
        stamps = torch.tensor([int(prefills[i].timestamps[-1]) for i in one], dtype=torch.int64, device=self.device)
        return dict(zip(one, self._extend_one_each(ids, stamps, [starts[i] for i in one]), strict=True))

    def _extend_one_each(self, ids: torch.Tensor, stamps: torch.Tensor, states: list[PrefixState]
                         ) -> list[PrefixState]:
        """Each state plus one token in one batched pass: replayed from a CUDA graph when one fits."""
        graphed = self.graphs(ids, stamps, states) if self.graphs is not None else None
        if graphed is None:
            return extend_one_each(self.encoder, self.item_table, ids, stamps, states)[1]
        return append_decoded(states, ids, stamps, *graphed)

    def _prefill(self, p: Prefill, state: PrefixState | None, extended: PrefixState | None = None) -> Prefilled:
        n, start = len(p.items), 0 if state is None else state.length
        take = min(p.budget, n - start)
        if take > 0:
            if extended is None:
                # One copy to the device for both (each copy from pageable memory waits for the GPU).
                ids, stamps = torch.from_numpy(np.stack([p.items[start : start + take],
                                                         p.timestamps[start : start + take]])).to(self.device)
                _, extended = extend(self.encoder, self.item_table, ids, stamps, state)
            state = extended
            if p.key is not None and self.cache is not None:
                self.cache.put(p.key, state, p.items, p.timestamps)
        if state is None:
            raise ValueError("a Prefill needs at least one event")
        return Prefilled(state, n - start - take, max(take, 0))

    def _scores(self, scores: Sequence[Score]) -> list[Recommendation]:
        users = torch.stack([s.state.user for s in scores])
        return self._top_k(users, [s.query for s in scores], [s.state.length for s in scores])

    def _decodes(self, decodes: Sequence[Decode]) -> list[Decoded]:
        """One step of every generation in the batch: one scoring product, then one batched pass that
        appends each chosen item (a generation whose window is full slides and is recomputed alone)."""
        scores = score_items(torch.stack([d.state.user for d in decodes]), self.item_vectors)
        chosen: list[tuple[int, float]] = []
        for b, d in enumerate(decodes):
            row = scores[b]
            if len(d.banned):
                row[torch.from_numpy(d.banned).to(self.device)] = float("-inf")
            item = self._sample(row, d.temperature, d.generator) if d.temperature > 0 else int(torch.argmax(row))
            chosen.append((item, float(row[item])))
        states: list[PrefixState | None] = [None] * len(decodes)
        room = [b for b, d in enumerate(decodes) if d.state.length < self.max_seq_len]
        if room:
            ids = torch.tensor([chosen[b][0] for b in room], dtype=torch.int64, device=self.device)
            stamps = torch.tensor([decodes[b].timestamp for b in room], dtype=torch.int64, device=self.device)
            extended = self._extend_one_each(ids, stamps, [decodes[b].state for b in room])
            for b, st in zip(room, extended, strict=True):
                states[b] = st
        for b, d in enumerate(decodes):
            if states[b] is None:
                states[b] = self._append(d.state, chosen[b][0], d.timestamp)
        return [Decoded(item, score, st) for (item, score), st in zip(chosen, states, strict=True)]

    def _sample(self, scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        """Draws an item from softmax(cosine / (temperature x ModelConfig.temperature)). Training's logits
        are cosine / ModelConfig.temperature (0.05), so temperature 1 is the distribution the model
        learnt; raw cosines (in [-1, 1]) divided by 1 would be close to uniform over the catalogue."""
        return sample_softmax(scores / (temperature * self.config.temperature), generator)

    def _beam_steps(self, steps: Sequence[BeamStep]) -> list[tuple[Beam, ...]]:
        return [self._beam_step(step) for step in steps]

    def _beam_step(self, step: BeamStep) -> tuple[Beam, ...]:
        beams = step.beams
        scores = score_items(torch.stack([b.state.user for b in beams]), self.item_vectors)
        banned = torch.from_numpy(step.banned).to(self.device)
        for row, beam in zip(scores, beams, strict=True):
            row[banned] = float("-inf")
            if beam.items:
                row[torch.tensor(beam.items, device=self.device)] = float("-inf")
        # Only each beam's `width` best items can survive, so only they get a log-probability: a
        # top-k and a logsumexp over the catalogue, in float32 on the device, not a log-softmax of it.
        logits = scores / self.config.temperature
        norm = torch.logsumexp(logits, dim=1, keepdim=True)
        top = logits.topk(min(step.width, logits.shape[1]), dim=1)
        prior = torch.tensor([b.log_prob for b in beams], dtype=torch.float64, device=self.device)[:, None]
        totals = (top.values - norm).double() + prior  # [beams, width]; NaN where a beam has no item left
        totals = totals.masked_fill(totals.isnan(), float("-inf"))
        width = min(step.width, int(torch.isfinite(totals).sum()))
        flat = torch.topk(totals.flatten(), width).indices
        rows, ranks = flat // totals.shape[1], flat % totals.shape[1]
        # The survivors, best first: (beam, item, log-probability of the beam's items and this one).
        winners = list(zip(rows.tolist(), top.indices[rows, ranks].tolist(), totals[rows, ranks].tolist(),
                           strict=True))
        chosen: dict[int, list[int]] = {}
        for b, c, _ in winners:
            chosen.setdefault(b, []).append(c)
        survivors: dict[tuple[int, int], PrefixState] = {}
        for b, items in chosen.items():
            ids = torch.tensor(items, dtype=torch.int64, device=self.device)
            stamps = torch.full_like(ids, step.timestamp)
            if beams[b].state.length < self.max_seq_len:  # all of this beam's survivors in one pass
                states = extend_candidates(self.encoder, self.item_table, ids, stamps, beams[b].state)[1]
            else:
                states = [self._append(beams[b].state, c, step.timestamp) for c in items]
            survivors.update({(b, c): st for c, st in zip(items, states, strict=True)})
        return tuple(Beam(survivors[(b, c)], beams[b].items + (c,), beams[b].scores + (float(scores[b, c]),), total)
                     for b, c, total in winners)

    def _append(self, state: PrefixState, item: int, timestamp: int) -> PrefixState:
        """A full window plus one token: it slides, which a prefix cannot follow, so it is recomputed."""
        ids = torch.tensor([item], dtype=torch.int64, device=self.device)
        stamps = torch.tensor([timestamp], dtype=torch.int64, device=self.device)
        window_ids = torch.cat([state.items[1:], ids])
        window_stamps = torch.cat([state.timestamps[1:], stamps])
        return extend(self.encoder, self.item_table, window_ids, window_stamps, None)[1]

    def warm_up(self, max_batch_size: int) -> float:
        """Runs every kind of model step once before the first request, so that no request pays for a
        first call; returns the seconds it took.

        First calls are slow on a GPU: the attention kernel is autotuned for each length bucket of a
        batch's longest sequence (``models.ops.hstu_attention.tuning_length``), about a second each, and
        CUDA loads a library kernel (a GEMM, a top-k, the scatter of exclusions) at its first launch,
        which kernel depending on the batch size. Under load such a stall fills the queue and requests
        are refused (docs/benchmarks.md, "Recommend at 500 QPS"). So: a batch at every tuning bucket;
        retrieval with exclusions at every batch size (on CUDA; a CPU loads nothing, and there a
        batch over a 10M-item catalogue costs seconds, so only 1 and ``max_batch_size``); a ranking
        query; with HSTU a chunked prefill, a one-event extension and a greedy and a sampled decode.
        """
        start = time.perf_counter()
        n, k = self.max_seq_len, min(10, self.num_items)
        items = np.arange(n, dtype=np.int64) % self.num_items + 1
        stamps = np.arange(n, dtype=np.int64) * 60

        def query(length: int, candidates: np.ndarray | None = None) -> Query:
            seen = np.unique(items[-length:])[: max(self.num_items - k, 0)]
            return Query(items[-length:], stamps[-length:], k, seen, candidates, chunk_size=10)

        for length in sorted({1, n, *(min(b, n) for b in tuning_lengths(n))}):
            self.compute([query(length)])
        for size in range(1, max_batch_size + 1) if self.device.type == "cuda" else sorted({1, max_batch_size}):
            self.compute([query(n)] * size)
        self.compute([query(n, candidates=np.unique(items)[: k + 1])])
        if self.incremental and n > 3:
            (half,) = self.compute([Prefill(None, items[:-2], stamps[:-2], budget=n // 2)])
            (rest,) = self.compute([Prefill(None, items[:-2], stamps[:-2], n, half.state)])
            (one,) = self.compute([Prefill(None, items[:-1], stamps[:-1], 1, rest.state)])
            sampler = torch.Generator(self.device).manual_seed(0)
            self.compute([Decode(one.state, items[:1], 0.0, int(stamps[-1])),
                          Decode(one.state, items[:1], 1.0, int(stamps[-1]), sampler)])
        if self.graphs is not None:
            log.info("captured %d CUDA graphs of the decode step", self.graphs.capture(max_batch_size))
        elapsed = time.perf_counter() - start
        log.info("warm-up took %.2fs", elapsed)
        return elapsed

