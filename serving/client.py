"""Command-line client: prints a user's recommendations (with titles when the export knows them).

Examples::

    python -m serving.client --user 42                                 # a known user, by id alone
    python -m serving.client --history 1193@978300760,661@978302109 --top-k 5
    python -m serving.client --user 42 --candidates 1193,661,914 --stream
    python -m serving.client --user 42 --append 2858@978400000            # AppendEvents, then recommend
    python -m serving.client --user 42 --generate 10 [--beam-width 4 | --temperature 0.5 --seed 7]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc


def make_channel(address: str, tls_ca: Path | None = None) -> grpc.Channel:
    """A blocking channel; TLS when ``tls_ca`` (the PEM that signed the server's certificate) is given."""
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))


def parse_history(text: str) -> list[pb.Event]:
    """``"1193@978300760,661@978302109"`` (item@unix-seconds, oldest first) -> events."""
    events = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        item, sep, stamp = part.partition("@")
        if not sep:
            raise argparse.ArgumentTypeError(f"history event {part!r} is not item@timestamp")
        events.append(pb.Event(item_id=item, timestamp=float(stamp)))
    return events


def split_ids(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def format_table(responses: Iterable[pb.RecommendResponse]) -> str:
    lines = [f"{'rank':>4}  {'item':>8}  {'score':>7}  title"]
    version = ""
    for r in responses:
        version = r.model_version
        for i, item in enumerate(r.items):
            lines.append(f"{r.offset + i + 1:>4}  {item.item_id:>8}  {item.score:>7.4f}  {item.title}")
    lines.append(f"model {version}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--user", default="", help="raw user id")
    p.add_argument("--history", type=parse_history, default=[], help="item@timestamp,... oldest first")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--exclude", type=split_ids, default=[], help="raw item ids, comma-separated")
    p.add_argument("--candidates", type=split_ids, default=[], help="rank these raw item ids only")
    p.add_argument("--stream", action="store_true", help="use RecommendStream")
    p.add_argument("--chunk-size", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate for TLS")
    p.add_argument("--append", type=parse_history, default=[],
                   help="item@timestamp,... to add to --user's server-side history first (AppendEvents)")
    p.add_argument("--generate", type=int, default=0, help="stream this many generated items (Generate)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="Generate: 0 greedy; else sampled, relative to the model's training temperature "
                        "(1: the distribution it learnt; smaller: closer to greedy; larger: closer to uniform)")
    p.add_argument("--seed", type=int, default=0, help="Generate: the sampler's seed")
    p.add_argument("--beam-width", type=int, default=0, help="Generate: beam search with this many beams")
    a = p.parse_args(argv)

    request = pb.RecommendRequest(user_id=a.user, history=a.history, top_k=a.top_k, exclude_item_ids=a.exclude,
                                  candidate_item_ids=a.candidates, chunk_size=a.chunk_size)
    with make_channel(a.address, a.tls_ca) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        try:
            if a.append:
                reply = stub.AppendEvents(pb.AppendEventsRequest(user_id=a.user, events=a.append), timeout=a.timeout)
                print(f"user {a.user!r} now has {reply.history_length} events", file=sys.stderr)
            if a.generate:
                generate = pb.GenerateRequest(context=request, num_items=a.generate, temperature=a.temperature,
                                              seed=a.seed, beam_width=a.beam_width)
                for g in stub.Generate(generate, timeout=a.timeout):  # printed as each item arrives
                    if g.step == 0:
                        print(f"{'step':>4}  {'item':>8}  {'score':>7}  title")
                    print(f"{g.step + 1:>4}  {g.item.item_id:>8}  {g.item.score:>7.4f}  {g.item.title}", flush=True)
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
