"""The model side of serving: an export's encoder and item table, run on batches of validated queries.

The forward pass is ``models.recommender.encode_histories`` + ``score_items``, the functions the
offline evaluation uses, on the exported (unnormalised) item rows, so served scores equal offline
ones. Retrieval scores the whole catalogue with one matrix product and masks the padding row, the
history and ``exclude`` before top-k; ranking mode reads the candidates' columns of the same scores.

Example::

    >>> engine = Engine(load_artifact("runs/latest/export"))
    >>> engine.warm_up(max_batch_size=32)
    >>> [rec] = engine.compute([query])       # query from serving.validation.parse_request
    >>> rec.items[:3], rec.scores[:3]         # dense ids, best first; cosine similarities
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.config import ModelConfig
from models.embeddings import l2_normalize
from models.recommender import build_encoder, encode_histories, score_items
from serving.artifact import Artifact
from serving.validation import Query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """One query's answer: dense ids best first, their scores, and the history length used."""

    items: np.ndarray
    scores: np.ndarray
    history_length: int


class Engine:
    """Holds the encoder and the item vectors; ``compute`` is called from one thread at a time."""

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu"):
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
        # Normalised once here rather than per batch: it is the right operand of every score.
        self.item_vectors = l2_normalize(self.item_table, self.config.l2_norm_eps)

    @property
    def max_len(self) -> int:
        return self.config.max_seq_len

    @torch.inference_mode()
    def compute(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Scores a batch of queries with one encoder call and one matrix product."""
        lengths = [len(q.items) for q in queries]
        offsets = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int64, device=self.device)
        ids = torch.from_numpy(np.concatenate([q.items for q in queries])).to(self.device)
        stamps = torch.from_numpy(np.concatenate([q.timestamps for q in queries])).to(self.device)
        users = encode_histories(self.encoder, self.item_table, ids, stamps, offsets)
        scores = score_items(users, self.item_vectors)  # [B, num_items + 1], padding column -inf

        out = []
        for b, q in enumerate(queries):
            row = scores[b]
            if q.candidates is None:
                row[torch.from_numpy(q.exclude).to(self.device)] = float("-inf")
                k = min(q.top_k, self.num_items - len(q.exclude))
                top = torch.topk(row, k)
                items, values = top.indices, top.values
            else:
                candidates = torch.from_numpy(q.candidates).to(self.device)
                top = torch.topk(row[candidates], min(q.top_k, len(candidates)))
                items, values = candidates[top.indices], top.values
            out.append(Recommendation(items.cpu().numpy(), values.float().cpu().numpy(), lengths[b]))
        return out

    def warm_up(self, max_batch_size: int) -> float:
        """Runs full-length batches of size 1 and ``max_batch_size`` once, so the first real requests
        do not pay for first-call allocations; returns the seconds it took."""
        start = time.perf_counter()
        n = self.max_len
        query = Query(
            items=np.arange(n, dtype=np.int64) % self.num_items + 1,
            timestamps=np.arange(n, dtype=np.int64) * 60,
            top_k=min(10, self.num_items),
            exclude=np.zeros(0, dtype=np.int64),
            candidates=None,
            chunk_size=10,
        )
        for size in sorted({1, max_batch_size}):
            self.compute([query] * size)
        elapsed = time.perf_counter() - start
        log.info("warm-up took %.2fs", elapsed)
        return elapsed
