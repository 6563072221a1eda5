"""Command-line client: prints a user's recommendations (with titles when the export knows them).

Items are named by their raw ids, as the data source writes them: MovieLens movie ids ("1193") from
GroupLens, titles ("Matrix, The (1999)") from the fallback copy of ML-1M; ``--search`` finds them.
Each item or event is one word of the command line (quote it when it has spaces), so an id may hold
commas. An event is ITEM@TIMESTAMP (Unix seconds), split at its last '@'.

Examples::

    python -m serving.client --search matrix                           # ids and titles containing "matrix"
    python -m serving.client --user 42                                 # a known user, by id alone
    python -m serving.client --history 1193@978300760 661@978302109 --top-k 5
    python -m serving.client --history "Matrix, The (1999)@978300760" "Toy Story (1995)@978302109"
    python -m serving.client --user 42 --candidates 1193 661 914 --stream
    python -m serving.client --user 42 --append 2858@978400000            # AppendEvents, then recommend
    python -m serving.client --user 42 --generate 10 [--beam-width 4 | --temperature 0.5 --seed 7]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc

ID_WIDTH = 8
"""Width of the item column of rows printed as they arrive (Generate), before the widest id is known:
MovieLens ids fit."""

EVENT_LIST = re.compile(r"@[0-9.]+,")
"""An ``@timestamp,`` inside an event's item: the comma-separated list this client once took."""


def make_channel(address: str, tls_ca: Path | None = None) -> grpc.Channel:
    """A blocking channel; TLS when ``tls_ca`` (the PEM that signed the server's certificate) is given."""
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))


def parse_event(text: str) -> pb.Event:
    """``"Matrix, The (1999)@978300760"`` -> an event. Split at the last '@': a timestamp holds none,
    an item id may."""
    item, sep, stamp = text.rpartition("@")
    if not sep or not item:
        raise argparse.ArgumentTypeError(f"event {text!r} is not ITEM@TIMESTAMP")
    if EVENT_LIST.search(item):
        raise argparse.ArgumentTypeError(f"event {text!r} holds several events: give each as its own word, "
                                         "e.g. --history 1193@978300760 661@978302109")
    try:
        seconds = float(stamp)
    except ValueError:
        raise argparse.ArgumentTypeError(f"event {text!r}: {stamp!r} is not a timestamp (Unix seconds)") from None
    return pb.Event(item_id=item, timestamp=seconds)


def item_cells(item_id: str, title: str, width: int) -> str:
    """The item and title columns: the id padded to ``width``, then the title, shown only when it says
    more than the id (from the title-keyed ML-1M data the id is the title)."""
    if not title or title == item_id:
        return item_id
    return f"{item_id:<{width}}  {title}"


def has_title(item: pb.ScoredItem | pb.CatalogueItem) -> bool:
    return bool(item.title) and item.title != item.item_id


def scored_row(rank: int, item: pb.ScoredItem, width: int) -> str:
    return f"{rank:>4}  {item.score:>7.4f}  {item_cells(item.item_id, item.title, width)}"


def scored_header(first: str, width: int, titles: bool) -> str:
    return f"{first:>4}  {'score':>7}  {item_cells('item', 'title' if titles else '', width)}"


def format_table(responses: Iterable[pb.RecommendResponse]) -> str:
    """Recommend / RecommendStream responses as one table, its item column as wide as its widest id."""
    ranked, version = [], ""
    for r in responses:
        version = r.model_version
        ranked += [(r.offset + i + 1, item) for i, item in enumerate(r.items)]
    width = max([len("item")] + [len(item.item_id) for _, item in ranked])
    lines = [scored_header("rank", width, any(has_title(item) for _, item in ranked))]
    lines += [scored_row(rank, item, width) for rank, item in ranked]
    lines.append(f"model {version}")
    return "\n".join(lines)


def format_search(reply: pb.SearchItemsResponse) -> str:
    if not reply.items:
        return "no item's id or title contains that text"
    width = max([len("item")] + [len(item.item_id) for item in reply.items])
    titles = any(has_title(item) for item in reply.items)
    lines = [item_cells("item", "title" if titles else "", width)]
    lines += [item_cells(item.item_id, item.title, width) for item in reply.items]
    lines.append(f"{len(reply.items)} of {reply.total_matches} matching items"
                 + (" (--top-k shows more)" if reply.total_matches > len(reply.items) else ""))
    return "\n".join(lines)


def print_generated(stream: Iterable[pb.GeneratedItem]) -> None:
    """Prints each generated item as it arrives."""
    for g in stream:
        if g.step == 0:
            print(scored_header("step", ID_WIDTH, has_title(g.item)))
        print(scored_row(g.step + 1, g.item, ID_WIDTH), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--search", metavar="TEXT", default="",
                   help="list the items whose raw id or title contains TEXT, ignoring case (SearchItems)")
    p.add_argument("--user", default="", help="raw user id")
    p.add_argument("--history", type=parse_event, nargs="+", action="extend", default=[], metavar="ITEM@TIMESTAMP",
                   help="events, oldest first, one word each (split at the last '@')")
    p.add_argument("--top-k", type=int, default=10, help="items to show (recommendations, or --search matches)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="ITEM",
                   help="raw item ids not to return")
    p.add_argument("--candidates", nargs="+", action="extend", default=[], metavar="ITEM",
                   help="rank these raw item ids only")
    p.add_argument("--stream", action="store_true", help="use RecommendStream")
    p.add_argument("--chunk-size", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate for TLS")
    p.add_argument("--append", type=parse_event, nargs="+", action="extend", default=[], metavar="ITEM@TIMESTAMP",
                   help="events to add to --user's server-side history first (AppendEvents), as --history")
    p.add_argument("--generate", type=int, default=0, help="stream this many generated items (Generate)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="Generate: 0 greedy; else sampled, relative to the model's training temperature "
                        "(1: the distribution it learnt; smaller: closer to greedy; larger: closer to uniform)")
    p.add_argument("--seed", type=int, default=0, help="Generate: the sampler's seed")
    p.add_argument("--beam-width", type=int, default=0, help="Generate: beam search with this many beams")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    request = pb.RecommendRequest(user_id=a.user, history=a.history, top_k=a.top_k, exclude_item_ids=a.exclude,
                                  candidate_item_ids=a.candidates, chunk_size=a.chunk_size)
    with make_channel(a.address, a.tls_ca) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        try:
            if a.search:
                print(format_search(stub.SearchItems(pb.SearchItemsRequest(query=a.search, limit=a.top_k),
                                                     timeout=a.timeout)))
                return 0
            if a.append:
                reply = stub.AppendEvents(pb.AppendEventsRequest(user_id=a.user, events=a.append), timeout=a.timeout)
                print(f"user {a.user!r} now has {reply.history_length} events", file=sys.stderr)
            if a.generate:
                generate = pb.GenerateRequest(context=request, num_items=a.generate, temperature=a.temperature,
                                              seed=a.seed, beam_width=a.beam_width)
                print_generated(stub.Generate(generate, timeout=a.timeout))
                return 0
            if a.stream:
                responses = list(stub.RecommendStream(request, timeout=a.timeout))
            else:
                responses = [stub.Recommend(request, timeout=a.timeout)]
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(format_table(responses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
