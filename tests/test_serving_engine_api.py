"""AppendEvents, Generate and the KV-cache Recommend path, against real servers on localhost: one
with the KV cache (small prefill chunks, so histories are prefilled over several model steps) and one
without, which computes every history in full and is the reference."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from benchmarks.random_export import START_TIME, make_random_artifact, raw_item_id
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.server import ServerConfig
from tests.serving_fixtures import ServerThread

NUM_ITEMS = 60


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    _, path = make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=NUM_ITEMS, num_users=8)
    cached = ServerConfig(artifact=path, port=0, metrics_port=0, kv_cache_mb=4, prefill_chunk_tokens=7)
    plain = ServerConfig(artifact=path, port=0)
    with (ServerThread(cached) as a, ServerThread(plain) as b, grpc.insecure_channel(a.address) as ca,
          grpc.insecure_channel(b.address) as cb):
        yield pb_grpc.RecommenderServiceStub(ca), pb_grpc.RecommenderServiceStub(cb), a


def events(items, start):
    return [pb.Event(item_id=raw_item_id(i), timestamp=start + 60 * n) for n, i in enumerate(items)]


def same(a: pb.RecommendResponse, b: pb.RecommendResponse) -> None:
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert [i.score for i in a.items] == pytest.approx([i.score for i in b.items], rel=1e-5, abs=1e-6)
    assert a.history_length == b.history_length


def test_cached_answers_after_append_events_equal_a_full_recompute(stubs):
    cached, plain, server = stubs
    before = cached.Recommend(pb.RecommendRequest(user_id="2", top_k=10), timeout=10)
    same(before, plain.Recommend(pb.RecommendRequest(user_id="2", top_k=10), timeout=10))
    new = events([5, 9, 11], START_TIME + 10**7)
    for stub in (cached, plain):
        reply = stub.AppendEvents(pb.AppendEventsRequest(user_id="2", events=new), timeout=10)
        assert reply.history_length == before.history_length + 3
    after = cached.Recommend(pb.RecommendRequest(user_id="2", top_k=10), timeout=10)
    same(after, plain.Recommend(pb.RecommendRequest(user_id="2", top_k=10), timeout=10))
    assert {i.item_id for i in after.items}.isdisjoint({raw_item_id(i) for i in (5, 9, 11)})
    cache = server.server.engine.cache
    assert cache.hits >= 1 and cache.misses >= 1  # the second request reused the first one's prefix


def test_a_new_user_starts_with_append_events(stubs):
    cached, plain, _ = stubs
    for stub in (cached, plain):
        reply = stub.AppendEvents(pb.AppendEventsRequest(user_id="new-user", events=events([1, 2, 3], START_TIME)),
                                  timeout=10)
        assert reply.history_length == 3
    same(cached.Recommend(pb.RecommendRequest(user_id="new-user", top_k=5), timeout=10),
         plain.Recommend(pb.RecommendRequest(user_id="new-user", top_k=5), timeout=10))


@pytest.mark.parametrize(("request_", "field"), [
    (pb.AppendEventsRequest(events=events([1], START_TIME)), "user_id"),
    (pb.AppendEventsRequest(user_id="3"), "events"),
    (pb.AppendEventsRequest(user_id="3", events=[pb.Event(item_id="nope", timestamp=START_TIME * 2)]),
     "events[0].item_id"),
    (pb.AppendEventsRequest(user_id="3", events=events([1], 0)), "events[0].timestamp"),  # older than stored
    (pb.AppendEventsRequest(user_id="3", events=[pb.Event(item_id="x" * 200, timestamp=START_TIME * 2)] * 6000),
     "request"),  # 1.3 MB, over the 1 MiB request limit
])
def test_bad_append_events(stubs, request_, field):
    cached, _, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        cached.AppendEvents(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    assert cached.Recommend(pb.RecommendRequest(user_id="3", top_k=3), timeout=10).items  # still serving


def test_greedy_generate_streams_the_model_on_its_growing_sequence(stubs):
    """Each generated item is the cache-less server's top recommendation for the history grown by the
    items generated before it (that server computes every history in full, through the jagged encoder)."""
    cached, plain, _ = stubs
    history = events([3, 8, 21, 40, 2], START_TIME)
    exclude = [raw_item_id(7)]
    request = pb.GenerateRequest(context=pb.RecommendRequest(history=history, exclude_item_ids=exclude), num_items=12)
    got = list(cached.Generate(request, timeout=20))
    assert [g.step for g in got] == list(range(12))
    ids = [g.item.item_id for g in got]
    assert len(set(ids)) == 12 and raw_item_id(7) not in ids
    last = history[-1].timestamp
    for step, generated in enumerate(got):
        grown = history + [pb.Event(item_id=i, timestamp=last) for i in ids[:step]]  # generated: gap 0
        top = plain.Recommend(pb.RecommendRequest(history=grown, exclude_item_ids=exclude, top_k=1), timeout=10)
        assert generated.item.item_id == top.items[0].item_id
        assert generated.item.score == pytest.approx(top.items[0].score, rel=1e-5, abs=1e-6)
    assert ids == [g.item.item_id for g in plain.Generate(request, timeout=20)]


def test_beam_search_generate(stubs):
    """Width 1 (through the beam-search steps) chooses what greedy (the Decode steps) does; a wider beam
    returns as many distinct allowed items, and the same on the cache-less server. The search itself is
    checked against a full-recompute reference in test_serving_kv_cache."""
    cached, plain, _ = stubs
    context = pb.RecommendRequest(user_id="6", exclude_item_ids=[raw_item_id(3)])
    greedy = [g.item.item_id for g in cached.Generate(pb.GenerateRequest(context=context, num_items=6), timeout=20)]
    width_one = cached.Generate(pb.GenerateRequest(context=context, num_items=6, beam_width=1), timeout=20)
    assert [g.item.item_id for g in width_one] == greedy
    request = pb.GenerateRequest(context=context, num_items=6, beam_width=4)
    beam = list(cached.Generate(request, timeout=20))
    ids = [g.item.item_id for g in beam]
    assert [g.step for g in beam] == list(range(6)) and len(set(ids)) == 6 and raw_item_id(3) not in ids
    assert ids == [g.item.item_id for g in plain.Generate(request, timeout=20)]


def test_sampled_generate_is_seeded(stubs):
    cached, _, _ = stubs
    request = pb.GenerateRequest(context=pb.RecommendRequest(user_id="5"), num_items=8, temperature=1.0, seed=11)
    first = [g.item.item_id for g in cached.Generate(request, timeout=20)]
    assert first == [g.item.item_id for g in cached.Generate(request, timeout=20)]
    request.seed = 12
    assert first != [g.item.item_id for g in cached.Generate(request, timeout=20)]


def test_generations_of_different_lengths_share_the_server(stubs):
    """Concurrent generations of 1 to 30 items join and leave the running batch; each gets its own."""
    cached, _, _ = stubs

    def run(n: int) -> list[str]:
        req = pb.GenerateRequest(context=pb.RecommendRequest(user_id=str(n % 8)), num_items=n)
        return [g.item.item_id for g in cached.Generate(req, timeout=60)]

    lengths = [1, 30, 5, 17, 2, 30, 9]
    with concurrent.futures.ThreadPoolExecutor(len(lengths)) as pool:
        together = list(pool.map(run, lengths))
    assert [len(x) for x in together] == lengths
    assert together == [run(n) for n in lengths]  # the same items as each alone


@pytest.mark.parametrize(("request_", "field"), [
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=0), "num_items"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=10**6), "num_items"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=3, temperature=float("nan")),
     "temperature"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=3, temperature=-1), "temperature"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=3, temperature=1e-40), "temperature"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=3, beam_width=33), "beam_width"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=3, beam_width=4, temperature=1.0),
     "beam_width"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="nobody"), num_items=3), "context.user_id"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1", candidate_item_ids=[raw_item_id(1)]),
                        num_items=3), "context.candidate_item_ids"),
])
def test_bad_generate(stubs, request_, field):
    cached, _, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        list(cached.Generate(request_, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    assert list(cached.Generate(pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=2),
                                timeout=10))


def test_generate_on_a_model_without_prefix_states_is_unimplemented(tmp_path):
    from models.config import EncoderType, ModelConfig

    _, path = make_random_artifact(tmp_path / "export", config=ModelConfig(encoder=EncoderType.SASREC))
    with ServerThread(ServerConfig(artifact=path, port=0)) as server, grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=2), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert stub.Recommend(pb.RecommendRequest(user_id="1", top_k=2), timeout=10).items


def test_the_model_side_of_serving_does_not_import_the_wire_format() -> None:
    """The engine and the batcher work on serving.work types: neither the protos nor gRPC nor request
    parsing is imported with them (a fresh interpreter, since this one has them all loaded)."""
    code = ("import sys, serving.engine, serving.batcher; "
            "print(sorted(m for m in sys.modules if m.startswith(('protos', 'grpc', 'serving.validation'))))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
