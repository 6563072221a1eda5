"""Turns a ``RecommendRequest`` into a ``Query`` of dense ids, or says which field is wrong.

Runs on the event loop before anything is enqueued, so a bad request costs microseconds and never
reaches (or stalls) a batch. Every error names the field the way the proto spells it, e.g.
``history[3].timestamp``, and the server answers it with INVALID_ARGUMENT.

Policy, chosen once here:
- ids: an unknown raw item id anywhere (history, exclude, candidates) is an error, not a skip.
- history: oldest first; a known user's stored history comes first and the request's events are
  appended. Longer than the model's ``max_seq_len``: the most recent ``max_seq_len`` events are used, the
  same truncation as training; beyond ``max_events`` the request is rejected as oversized.
- timestamps: finite, >= 0 and below 2**53 seconds, non-decreasing (ties allowed).
- user ids: at most ``max_id_chars`` characters. An error message quotes client input cut to
  ``ECHO_CHARS`` characters: a message travels as gRPC metadata, whose size is limited, and must not
  grow with what the client sent.
- retrieval never returns the padding row, the items the user has seen or ``exclude_item_ids``. Seen
  is ``RequestLimits.exclude_seen`` (``data.splits.SeenItems``): the whole history (default), or only
  the window the model reads, as the run that made the export decided. Ranking scores the candidates
  minus ``exclude_item_ids``.

Example::

    >>> q = parse_request(RecommendRequest(user_id="1", top_k=10), catalogue, RequestLimits(max_seq_len=200))
    >>> q.top_k, q.candidates is None
    (10, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.splits import SeenItems
from protos.genrec.v1 import recommender_pb2 as pb
from serving.catalogue import Catalogue
from serving.work import Generation, Query

MAX_TIMESTAMP = float(2**53)
"""Doubles hold every whole second exactly below this; beyond it a timestamp is not a time."""

ECHO_CHARS = 100
"""The most characters of one client-supplied string that an error message quotes."""


class InvalidRequest(ValueError):
    """A request the server refuses; ``field`` is the proto path of the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request. ``max_seq_len`` comes from the model; the others stop oversized input.

    Attributes:
        max_id_chars: longest user_id (a key of server-side state: the KV cache, appended events).
        max_generate_items: most items one Generate may ask for (each is a model step).
        max_beam_work: most beam_width x num_items of one beam search: the sequences it extends in all
            (a step of width w costs about w greedy steps).
        exclude_seen: which of the history's items retrieval never returns.
    """

    max_seq_len: int
    max_request_bytes: int = 1 << 20
    max_events: int = 10_000
    max_item_list: int = 10_000
    default_chunk_size: int = 10
    max_id_chars: int = 128
    max_generate_items: int = 1_000
    max_beam_work: int = 4_096
    exclude_seen: SeenItems = SeenItems.HISTORY


def parse_request(request: pb.RecommendRequest, catalogue: Catalogue, limits: RequestLimits) -> Query:
    """Validates ``request`` against the catalogue; raises ``InvalidRequest`` naming the field."""
    size = request.ByteSize()
    if size == 0:
        raise InvalidRequest("request", "empty; give a user_id or a history, and a top_k")
    if size > limits.max_request_bytes:
        raise InvalidRequest("request", f"{size} bytes exceeds the limit of {limits.max_request_bytes}")
    top_k = _check_top_k(request.top_k, catalogue.num_items)
    if request.chunk_size < 0:
        raise InvalidRequest("chunk_size", f"must be >= 0, got {request.chunk_size}")

    items, stamps = _history(request, catalogue, limits)
    exclude = _item_list(request.exclude_item_ids, "exclude_item_ids", catalogue, limits)
    if len(request.candidate_item_ids) > 0:
        candidates = _item_list(request.candidate_item_ids, "candidate_item_ids", catalogue, limits)
        # Unique, in the caller's order (np.unique would sort), minus the excluded ones.
        candidates = candidates[np.sort(np.unique(candidates, return_index=True)[1])]
        candidates = candidates[~np.isin(candidates, exclude)]
    else:
        candidates = None
        seen = items if limits.exclude_seen is SeenItems.HISTORY else items[-limits.max_seq_len :]
        exclude = np.union1d(seen, exclude)
    return Query(
        items=items[-limits.max_seq_len :],
        timestamps=stamps[-limits.max_seq_len :],
        top_k=top_k,
        exclude=exclude,
        candidates=candidates,
        chunk_size=request.chunk_size or limits.default_chunk_size,
    )


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut to ``ECHO_CHARS`` characters."""
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def _check_user_id(user_id: str, limits: RequestLimits) -> None:
    if len(user_id) > limits.max_id_chars:
        raise InvalidRequest("user_id", f"{_shown(user_id)} is longer than the limit of {limits.max_id_chars}")


def _check_top_k(top_k: int, num_items: int) -> int:
    if top_k <= 0:
        raise InvalidRequest("top_k", f"must be >= 1, got {top_k}")
    if top_k > num_items:
        raise InvalidRequest("top_k", f"{top_k} exceeds the catalogue size {num_items}")
    return top_k


def _history(request: pb.RecommendRequest, catalogue: Catalogue, limits: RequestLimits
             ) -> tuple[np.ndarray, np.ndarray]:
    """The full history (stored + request events) as dense ids and int64 seconds."""
    events = request.history
    _check_user_id(request.user_id, limits)
    if len(events) > limits.max_events:
        raise InvalidRequest("history", f"{len(events)} events exceed the limit of {limits.max_events}")
    stored = catalogue.user_history(request.user_id) if request.user_id else None
    if len(events) == 0:
        if stored is not None:
            return stored.items, stored.timestamps
        if request.user_id:
            raise InvalidRequest("user_id", f"unknown user {_shown(request.user_id)} and no history given")
        raise InvalidRequest("history", "empty, and no user_id given")

    raw = [e.item_id for e in events]
    items = catalogue.dense_ids(raw)
    if not items.all():
        i = int(np.argmin(items))
        what = "is empty" if not raw[i] else f"unknown item {_shown(raw[i])}"
        raise InvalidRequest(f"history[{i}].item_id", what)

    seconds = np.fromiter((e.timestamp for e in events), dtype=np.float64, count=len(events))
    bad = ~np.isfinite(seconds) | (seconds < 0) | (seconds >= MAX_TIMESTAMP)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidRequest(f"history[{i}].timestamp",
                             f"{seconds[i]} is not a time (finite seconds in [0, 2**53) expected)")
    backwards = np.diff(seconds) < 0
    if backwards.any():
        i = int(np.argmax(backwards)) + 1
        raise InvalidRequest(f"history[{i}].timestamp", f"{seconds[i]:.0f} is earlier than history[{i - 1}]'s "
                             f"{seconds[i - 1]:.0f}; events must be oldest first")
    stamps = np.floor(seconds).astype(np.int64)

    if stored is None or len(stored) == 0:
        return items, stamps
    if stamps[0] < stored.timestamps[-1]:
        raise InvalidRequest("history[0].timestamp", f"{stamps[0]} is earlier than user {_shown(request.user_id)}'s "
                             f"last known event ({stored.timestamps[-1]}); send only newer events")
    return np.concatenate([stored.items, items]), np.concatenate([stored.timestamps, stamps])


def _item_list(raw: list[str], field: str, catalogue: Catalogue, limits: RequestLimits) -> np.ndarray:
    if len(raw) > limits.max_item_list:
        raise InvalidRequest(field, f"{len(raw)} ids exceed the limit of {limits.max_item_list}")
    ids = catalogue.dense_ids(list(raw))
    if not ids.all():
        i = int(np.argmin(ids))
        raise InvalidRequest(f"{field}[{i}]", "is empty" if not raw[i] else f"unknown item {_shown(raw[i])}")
    return ids


def parse_append(request: pb.AppendEventsRequest, catalogue: Catalogue, limits: RequestLimits
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The new events of an AppendEvents request as (dense ids, seconds), validated as a history is:
    known items, finite non-decreasing timestamps, none older than the user's last known event."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest("request", f"{size} bytes exceeds the limit of {limits.max_request_bytes}")
    if not request.user_id:
        raise InvalidRequest("user_id", "required: events belong to a user")
    _check_user_id(request.user_id, limits)
    if len(request.events) == 0:
        raise InvalidRequest("events", "empty; send at least one event")
    stored = catalogue.user_history(request.user_id)
    as_history = pb.RecommendRequest(user_id=request.user_id, history=request.events)
    try:
        items, stamps = _history(as_history, catalogue, limits)
    except InvalidRequest as e:
        field = "events" + e.field.removeprefix("history")
        raise InvalidRequest(field, str(e).split(": ", 1)[1]) from None
    old = 0 if stored is None else len(stored)
    return items[old:], stamps[old:]


MAX_TEMPERATURE = 100.0
MAX_BEAM_WIDTH = 32
MIN_TEMPERATURE = 1e-3
"""Temperatures are relative to the trained one (``Engine._sample``): at 1e-3 the logits are cosine /
5e-5 with the default 0.05, greedy in all but name; far below, 1/t overflows."""


def parse_generate(request: pb.GenerateRequest, catalogue: Catalogue, limits: RequestLimits) -> Generation:
    """Validates a GenerateRequest; errors in its context are named ``context.<field>``."""
    context = pb.RecommendRequest()
    context.CopyFrom(request.context)
    if len(context.candidate_item_ids) > 0:
        raise InvalidRequest("context.candidate_item_ids", "not used by Generate; leave it empty")
    context.top_k = 1  # Generate's length is num_items; top_k is not used
    try:
        query = parse_request(context, catalogue, limits)
    except InvalidRequest as e:
        raise InvalidRequest(f"context.{e.field}", str(e).split(": ", 1)[1]) from None
    available = catalogue.num_items - len(query.exclude)
    if not 1 <= request.num_items <= available:
        raise InvalidRequest("num_items", f"must be in [1, {available}] (the catalogue minus history and "
                             f"exclusions), got {request.num_items}")
    if request.num_items > limits.max_generate_items:
        raise InvalidRequest("num_items", f"{request.num_items} exceeds the server's limit of "
                             f"{limits.max_generate_items}")
    t = request.temperature
    if not (np.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        raise InvalidRequest("temperature",
                             f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t}")
    width = request.beam_width
    if not 0 <= width <= MAX_BEAM_WIDTH:
        raise InvalidRequest("beam_width", f"must be in [0, {MAX_BEAM_WIDTH}] (0: no beam search), got {width}")
    if width > 0 and t > 0:
        raise InvalidRequest("beam_width", "beam search is deterministic: use it with temperature 0")
    if width * request.num_items > limits.max_beam_work:
        raise InvalidRequest("beam_width", f"beam_width x num_items = {width * request.num_items} exceeds the "
                             f"server's limit of {limits.max_beam_work}")
    return Generation(query, request.num_items, float(t), int(request.seed), width)


MAX_SEARCH_CHARS = 200
MAX_SEARCH_LIMIT = 1_000
DEFAULT_SEARCH_LIMIT = 20


def parse_search(request: pb.SearchItemsRequest) -> tuple[str, int]:
    """A SearchItemsRequest as (query, limit). Both are bounded: the scan costs the catalogue's size
    times the query's length, and the reply holds ``limit`` items."""
    if not request.query:
        raise InvalidRequest("query", "empty; give part of an item's id or title")
    if len(request.query) > MAX_SEARCH_CHARS:
        raise InvalidRequest("query", f"{_shown(request.query)} is longer than the limit of {MAX_SEARCH_CHARS}")
    if not 0 <= request.limit <= MAX_SEARCH_LIMIT:
        raise InvalidRequest("limit", f"must be in [0, {MAX_SEARCH_LIMIT}] (0: {DEFAULT_SEARCH_LIMIT}), "
                             f"got {request.limit}")
    return request.query, request.limit or DEFAULT_SEARCH_LIMIT
