"""The work the serving engine computes, in the model's terms: no protos, no gRPC.

``serving.validation`` turns wire requests into these (dense item ids, seconds, bounds checked); the
batcher queues them without looking inside; ``serving.engine`` computes them. A step of the KV-cache
path may answer ``Continue(next_work)`` to be computed again in the batcher's next model step.

Example::

    >>> import numpy as np
    >>> q = Query(items=np.array([12, 977]), timestamps=np.array([100, 160]), top_k=10,
    ...           exclude=np.array([12, 977]), candidates=None, chunk_size=10)
    >>> isinstance(q, Work), Continue(q).work is q
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from models.incremental import PrefixState

W = TypeVar("W")


@dataclass(frozen=True)
class Query:
    """A validated request in the model's terms (all arrays int64 dense ids / seconds).

    Attributes:
        items: [n] the history the model sees, oldest first, 1 <= n <= the model's max_seq_len.
        timestamps: [n] seconds, aligned with ``items``.
        top_k: items wanted (>= 1).
        exclude: dense ids never to return (retrieval: history ∪ exclude_item_ids).
        candidates: [c] unique dense ids to rank, or None for retrieval over the catalogue.
        chunk_size: items per RecommendStream message.
    """

    items: np.ndarray
    timestamps: np.ndarray
    top_k: int
    exclude: np.ndarray
    candidates: np.ndarray | None
    chunk_size: int


@dataclass(frozen=True)
class Generation:
    """A validated GenerateRequest: the user's query (its ``exclude`` holds history and exclusions)."""

    query: Query
    num_items: int
    temperature: float
    seed: int
    beam_width: int = 0  # 0: no beam search


@dataclass(frozen=True)
class Recommendation:
    """One query's answer: dense ids best first, their scores, and the history length used."""

    items: np.ndarray
    scores: np.ndarray
    history_length: int


@dataclass(frozen=True)
class Prefill:
    """Bring the user's cached state up to (items, timestamps), computing at most ``budget`` new tokens.

    ``key`` None: nothing is cached (an anonymous history). ``state``: the progress of an earlier
    chunk (then the cache is not consulted). ``chain``: instead of a partial ``Prefilled``, answer
    ``Continue`` with the next chunk, which the batcher computes in its next model step.
    """

    key: str | None
    items: np.ndarray
    timestamps: np.ndarray
    budget: int
    state: PrefixState | None = None
    chain: bool = False


@dataclass(frozen=True)
class Prefilled:
    state: PrefixState
    remaining: int  # tokens of the history still to compute (submit another Prefill)
    computed: int  # tokens computed by this step


@dataclass(frozen=True)
class Score:
    """Retrieve or rank for ``query`` from the user embedding at the end of ``state``."""

    state: PrefixState
    query: Query


@dataclass(frozen=True)
class Decode:
    """One generation step: choose the next item after ``state`` and append it.

    ``temperature`` 0 is greedy; above 0 samples with ``generator`` from softmax(cosine / (temperature x
    the model's trained temperature)), so 1 samples the distribution the model was trained on.
    The chosen item gets ``timestamp`` (the request's last event time: a time gap of 0).
    """

    state: PrefixState
    banned: np.ndarray
    temperature: float
    timestamp: int
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Decoded:
    item: int
    score: float
    state: PrefixState


@dataclass(frozen=True)
class Beam:
    """One hypothesis of a beam search: the sequence state after its items, and their log-probability
    under the model's softmax (cosine / the trained temperature), summed over the steps."""

    state: PrefixState
    items: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()  # the cosine score of each item when chosen
    log_prob: float = 0.0


@dataclass(frozen=True)
class BeamStep:
    """One step of a beam search: every beam's ``width`` best next items compete, the ``width`` best
    continuations survive (each beam's survivors appended in one pass). The result: the new beams,
    best first."""

    beams: tuple[Beam, ...]
    banned: np.ndarray
    width: int
    timestamp: int


Work = Query | Prefill | Score | Decode | BeamStep


@dataclass(frozen=True)
class Continue(Generic[W]):
    """A result that is not final: compute ``work`` in the next batch for the same caller."""

    work: W
