"""Issue #20 (reliability), against real servers on localhost: bounded generations, bounded echoes of
client input, undecodable requests, bounded AppendEvents state, bounded concurrent RPCs, and RPCs
whose deadline passes before they are answered. Every wait is bounded, so a hang fails the test."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc._cython.cygrpc import ExecuteBatchError

from benchmarks.random_export import make_random_artifact
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.batcher import BatcherConfig
from serving.metrics import Metrics
from serving.server import RecommenderServicer, ServerConfig
from tests.serving_fixtures import Gate, ServerThread

NUM_ITEMS = 3000  # room for long generations


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=NUM_ITEMS, num_users=8,
                                history_len=(5, 10))[1]


def timed(call) -> tuple[str, float]:
    """The status of ``call()`` (its name, and the details of an error) and the seconds it took."""
    start = time.perf_counter()
    try:
        call()
        code = "OK"
    except grpc.RpcError as e:
        code = f"{e.code().name}: {e.details()}"
    return code, time.perf_counter() - start


def test_generations_beyond_the_limit_are_refused_at_arrival_and_recommend_is_still_served(artifact):
    """Issue #20, 2: 40 generations on a server with small batches (default --max-generations 32):
    the eight beyond the limit are refused at once, and Recommend requests sent meanwhile are all
    answered OK (generation steps neither take the queue's room nor every slot of every batch)."""
    config = ServerConfig(artifact=artifact, port=0, batcher=BatcherConfig(max_batch_size=4, max_queue_size=48))
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel, \
            ThreadPoolExecutor(40) as pool:
        stub = pb_grpc.RecommenderServiceStub(channel)
        request = pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=1000)
        streams = [stub.Generate(request, timeout=60) for _ in range(40)]
        firsts = list(pool.map(lambda s: timed(lambda: next(s)), streams))
        refused = [t for code, t in firsts if code.startswith("RESOURCE_EXHAUSTED: server busy: 32 of 32 generations")]
        assert [code for code, _ in firsts].count("OK") == 32 and len(refused) == 8, firsts
        assert max(refused) < 1.0  # at arrival, not after waiting for a slot
        probes = [timed(lambda: stub.Recommend(pb.RecommendRequest(user_id="2", top_k=5), timeout=5))
                  for _ in range(20)]
        assert [code for code, _ in probes] == ["OK"] * 20, probes
        assert server.server._servicer.generations == 32  # all still generating
        for stream in streams:
            stream.cancel()


@pytest.mark.parametrize(("request_", "field"), [
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=1001), "num_items: 1001 exceeds"),
    (pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=129, beam_width=32),
     "beam_width: beam_width x num_items = 4128 exceeds"),
])
def test_the_work_of_one_generation_is_bounded(artifact, request_, field):
    """Issue #20, 2: num_items could reach the catalogue size, and beam_width 32 x 1000 items ran for
    70 s. Now --max-generate-items (1000) and --max-beam-work (4096) bound them."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.RecommenderServiceStub(channel).Generate(request_, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)


LONG = "u" * 100_000


@pytest.mark.parametrize(("method", "request_", "field"), [
    ("Recommend", pb.RecommendRequest(user_id=LONG, top_k=3), "user_id"),
    ("Recommend", pb.RecommendRequest(history=[pb.Event(item_id=LONG, timestamp=1)], top_k=3), "history[0].item_id"),
    ("Recommend", pb.RecommendRequest(user_id="1", top_k=3, exclude_item_ids=[LONG]), "exclude_item_ids[0]"),
    ("Recommend", pb.RecommendRequest(user_id="1", top_k=3, candidate_item_ids=[LONG]), "candidate_item_ids[0]"),
    ("AppendEvents", pb.AppendEventsRequest(user_id=LONG, events=[pb.Event(item_id="1001", timestamp=1)]),
     "user_id"),
    ("AppendEvents", pb.AppendEventsRequest(user_id="new", events=[pb.Event(item_id=LONG, timestamp=1)]),
     "events[0].item_id"),
    ("Generate", pb.GenerateRequest(context=pb.RecommendRequest(user_id=LONG), num_items=2), "context.user_id"),
])
def test_long_client_input_is_invalid_argument_and_not_echoed_in_full(artifact, method, request_, field):
    """Issue #20, 4: a 100,000-character user_id came back as RESOURCE_EXHAUSTED "received metadata
    size exceeds hard limit": the error details quoted it whole. Ids are now bounded (--max-id-chars)
    and what an error quotes of the client's input is cut to about 100 characters."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        call = getattr(pb_grpc.RecommenderServiceStub(channel), method)
        with pytest.raises(grpc.RpcError) as e:
            reply = call(request_, timeout=10)
            list(reply) if method == "Generate" else reply
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()[:200]
        assert e.value.details().startswith(field + ":") and len(e.value.details()) < 300, e.value.details()


@pytest.mark.parametrize("method", ["Recommend", "RecommendStream", "AppendEvents", "Generate", "SearchItems"])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"], ids=["corrupt", "bad-utf8"])
def test_undecodable_request_is_invalid_argument_logged_in_one_line(artifact, caplog, method, raw):
    """Issue #20, 5: bytes that are not a request message were answered UNKNOWN, with a 7-line ERROR
    traceback in the log each time."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        path = f"/genrec.v1.RecommenderService/{method}"
        streaming = method in ("RecommendStream", "Generate")
        call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
        caplog.clear()
        with pytest.raises(grpc.RpcError) as e:
            reply = call(raw, timeout=10)
            list(reply) if streaming else reply
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith("request: not a genrec.v1."), e.value.details()
        assert len(pb_grpc.RecommenderServiceStub(channel).Recommend(
            pb.RecommendRequest(user_id="1", top_k=2), timeout=10).items) == 2
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING and "fx_tracing" not in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None and "\n" not in logged[0].getMessage(), \
        [r.getMessage() for r in logged]
    assert logged[0].levelno == logging.WARNING and method in logged[0].getMessage()


def append(stub, user: str, n: int, start: float = 2e9) -> int:
    """Appends ``n`` events to ``user``; returns the history length the server reports."""
    events = [pb.Event(item_id=str(1001 + i % 50), timestamp=start + i) for i in range(n)]
    return stub.AppendEvents(pb.AppendEventsRequest(user_id=user, events=events), timeout=10).history_length


def known(stub, user: str) -> bool:
    try:
        stub.Recommend(pb.RecommendRequest(user_id=user, top_k=1), timeout=10)
        return True
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown user" in e.details()
        return False


def test_append_events_holds_at_most_1000_events_per_user_by_default(artifact):
    """Issue #20, 6: AppendEvents held up to 10,000 events per user (one request's limit), for any
    number of users, forever. By default (--max-appended-events) a user keeps its last 1000."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert append(stub, "newcomer", 1500) == 1000
        assert append(stub, "newcomer", 10, start=3e9) == 1000


def test_append_events_keeps_the_most_recently_used_users_within_the_limit(artifact):
    """Issue #20, 6: at most --max-appended-users users' appended events are held; the least recently
    used (appended to or read) go first, and a user the export knows falls back to its stored history."""
    config = ServerConfig(artifact=artifact, port=0, max_appended_users=3, max_appended_events=4)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        stored = stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length
        assert append(stub, "1", 10) == stored + 4  # the last 4 of the 10
        for user in ("a", "b"):
            assert append(stub, user, 2) == 2
        assert known(stub, "a")  # "a" is now more recent than "1"
        assert append(stub, "c", 1) == 1  # evicts "1", the least recently used
        assert stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length == stored
        assert [known(stub, u) for u in ("a", "b", "c")] == [True, True, True]
        assert append(stub, "d", 1) == 1  # evicts "a"
        assert [known(stub, u) for u in ("a", "b", "c", "d")] == [False, True, True, True]


def test_appended_events_survive_a_restart(artifact, tmp_path):
    """Issue #15, 3: AppendEvents writes through an SQLite file, so a server restarted on the same file
    knows what was appended before (and its least-recently-used bound still holds)."""
    config = ServerConfig(artifact=artifact, port=0, appended_events=tmp_path / "appended.sqlite",
                          max_appended_users=2, max_appended_events=4)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        stored = stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length
        assert append(stub, "1", 6) == stored + 4
        assert append(stub, "newcomer", 3) == 3
        before = stub.Recommend(pb.RecommendRequest(user_id="newcomer", top_k=5), timeout=10)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length == stored + 4
        after = stub.Recommend(pb.RecommendRequest(user_id="newcomer", top_k=5), timeout=10)
        assert after.history_length == 3 and [i.item_id for i in after.items] == [i.item_id for i in before.items]
        assert append(stub, "other", 1) == 1  # a third user: "1", the least recently used, loses its events
        assert stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length == stored


def test_append_events_can_be_disabled(artifact):
    """Issue #20, 6: AppendEvents writes server-side state and the server authenticates no caller;
    a server whose callers are not all trusted runs with it off (--no-append-events)."""
    with ServerThread(ServerConfig(artifact=artifact, port=0, append_events=False)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            append(stub, "someone", 1)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "disabled" in e.value.details()
        assert not known(stub, "someone")


def test_a_request_that_cannot_finish_behind_the_batch_computing_is_refused_at_arrival():
    """Issue #20, 3: the wait a new request faces left out the batch already computing, so under
    overload requests were admitted, computed and then late. With a 0.3 s batch computing, a request
    with 0.4 s left (it needs ~0.3 s more for its own batch) is refused at once."""
    from serving.batcher import DeadlineExpired, DynamicBatcher

    def compute(items):
        time.sleep(0.3)
        return list(items)

    async def main() -> float:
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=4, max_queue_delay_ms=0))
        await b.start()
        await b.submit("measures the batch time")
        computing = asyncio.ensure_future(b.submit("computing"))
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        with pytest.raises(DeadlineExpired):
            await b.submit("late", timeout=0.4)
        refused_after = time.perf_counter() - start
        await computing
        await b.close()
        return refused_after

    assert asyncio.run(asyncio.wait_for(main(), timeout=10)) < 0.05


def test_a_burst_beyond_two_batches_is_refused_at_arrival_by_default(artifact):
    """Issue #20, 3: with the default queue (256 then) a burst queued for seconds behind the model, so
    under overload requests were computed after their callers had given up. By default the queue
    holds one batch beside the one computing; the rest of a burst is refused at once."""
    with ServerThread(ServerConfig(artifact=artifact, port=0, metrics_port=0)) as server, \
            grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(100) as pool:
        stub = pb_grpc.RecommenderServiceStub(channel)
        gate = Gate(server)
        first = stub.Recommend.future(pb.RecommendRequest(user_id="1", top_k=2), timeout=20)
        assert gate.entered.wait(10)  # the model is held with one batch
        burst = list(pool.map(lambda _: stub.Recommend.future(pb.RecommendRequest(user_id="2", top_k=2), timeout=20),
                              range(100)))
        queue = BatcherConfig().max_queue_size
        deadline = time.monotonic() + 2  # the refusals come at once, not after the callers' 20 s
        while sum(f.done() for f in burst) < 100 - queue and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [f for f in burst if f.done()]
        gate.open()
        assert queue <= 32 and len(refused) == 100 - queue
        assert {f.code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(len(f.result(timeout=20).items) == 2 for f in [first, *burst] if f not in refused)


def test_rpcs_beyond_the_concurrency_limit_are_refused_before_their_message_is_read(artifact):
    """Issue #20, 7: nothing bounded the RPCs in progress, so 400 concurrent ~4 MiB requests were all
    received and parsed at once (RSS 1.58 -> 2.79 GiB). Past --max-concurrent-rpcs gRPC refuses a call
    at arrival, before reading its message."""
    config = ServerConfig(artifact=artifact, port=0, max_concurrent_rpcs=8, max_generations=4,
                          batcher=BatcherConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=16))
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel, \
            ThreadPoolExecutor(20) as pool:
        stub = pb_grpc.RecommenderServiceStub(channel)
        gate = Gate(server)
        held = [stub.Recommend.future(pb.RecommendRequest(user_id="1", top_k=2), timeout=20) for _ in range(8)]
        assert gate.entered.wait(10)
        deadline = time.monotonic() + 10
        while server.server._servicer.in_flight < 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        big = pb.RecommendRequest(user_id="1", top_k=2, exclude_item_ids=["x" * 1000] * 3000)  # ~3 MiB
        refused = list(pool.map(lambda _: timed(lambda: stub.Recommend(big, timeout=20)), range(20)))
        gate.open()
        assert {code for code, _ in refused} == {"RESOURCE_EXHAUSTED: Concurrent RPC limit exceeded!"}, refused
        assert max(t for _, t in refused) < 2.0
        assert all(len(f.result(timeout=20).items) == 2 for f in held)



class FinishedRpc:
    """A servicer context whose RPC gRPC has already ended (its deadline passed while the refusal was
    on its way): sending a status fails, as grpc.aio's abort does then."""

    def time_remaining(self) -> float:
        return 0.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise ExecuteBatchError("Failed \"execute_batch\": (<grpc._cython.cygrpc.SendStatusFromServerOperation>,)")


@pytest.mark.parametrize("method", ["Recommend", "RecommendStream", "AppendEvents", "Generate", "SearchItems"])
def test_a_refusal_that_finds_the_rpc_already_over_ends_it_quietly(method):
    """Issue #20, 13: under overload a refusal (here UNAVAILABLE: no model loaded) could reach gRPC after
    the RPC's deadline had ended it; abort then raised ExecuteBatchError out of the handler and gRPC
    logged its traceback. The handler now ends as gRPC's own cancellation would (CancelledError,
    logged by gRPC at DEBUG)."""
    servicer = RecommenderServicer(Metrics())
    request = {"Generate": pb.GenerateRequest(num_items=1), "AppendEvents": pb.AppendEventsRequest(user_id="1"),
               "SearchItems": pb.SearchItemsRequest(query="x")}.get(method, pb.RecommendRequest(user_id="1", top_k=1))

    async def call() -> None:
        reply = getattr(servicer, method)(request, FinishedRpc())
        if method in ("RecommendStream", "Generate"):
            async for _ in reply:
                pass
        else:
            await reply

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(asyncio.wait_for(call(), timeout=5))
    assert servicer.in_flight == 0


def test_what_the_server_loaded_is_never_walked_by_the_garbage_collector(artifact):
    """Python's full collections walk every tracked container; the catalogue's id lists hold one entry
    per item, so at 10M items each walk stalled every thread for ~0.1-0.2 s, the first ones while the
    first requests of a loaded server arrived (requests refused at 500 QPS). Once ready, the server
    freezes what it loaded: the collector never visits it again until the server stops."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as server:
        catalogue = server.server._servicer.loaded.catalogue
        walked = {id(o) for o in gc.get_objects()}
        assert id(catalogue.raw_ids) not in walked and id(catalogue.titles) not in walked
        assert len(catalogue.raw_ids) == NUM_ITEMS + 1
    # Stopped: handed back, so a process that starts many servers can free them.
    walked = {id(o) for o in gc.get_objects()}
    assert id(catalogue.raw_ids) in walked and id(catalogue.titles) in walked
