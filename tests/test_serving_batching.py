"""Dynamic batching, back-pressure, deadlines and graceful shutdown, against a real server.

A ``Gate`` (``tests/serving_fixtures.py``) wraps the engine so a test can hold the model thread busy for as long as
it needs, which makes queue-full and deadline cases deterministic instead of timing-dependent.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.random_export import make_random_artifact, raw_item_id
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving import server as server_module
from serving.batcher import BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull
from serving.server import SERVICE_NAME, ServerConfig
from tests.serving_fixtures import Gate, ServerThread

NUM_ITEMS = 40


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=NUM_ITEMS, num_users=4)[1]


def start(artifact, **batcher) -> ServerThread:
    config = ServerConfig(artifact=artifact, port=0, metrics_port=0, batcher=BatcherConfig(**batcher))
    return ServerThread(config).start()


def request(length: int, top_k: int = 3) -> pb.RecommendRequest:
    """An anonymous request whose history length identifies it in ``Gate.computed``."""
    history = [pb.Event(item_id=raw_item_id(1 + n % NUM_ITEMS), timestamp=1_000 + n) for n in range(length)]
    return pb.RecommendRequest(history=history, top_k=top_k)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def metric(server: ServerThread, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_not_serving_until_the_model_is_loaded_and_warm(artifact, monkeypatch):
    loading = threading.Event()
    real_engine = server_module.Engine

    def slow_engine(*args, **kwargs):  # the export is read before the port opens; the model is built after
        assert loading.wait(20)
        return real_engine(*args, **kwargs)

    monkeypatch.setattr(server_module, "Engine", slow_engine)
    server = ServerThread(ServerConfig(artifact=artifact, port=0)).start(wait=False)
    try:
        wait_until(lambda: server.port != 0)
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            status = health.Check(check, timeout=10, wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.RecommenderServiceStub(channel).Recommend(request(2), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            loading.set()
            server.starting.result(timeout=60)
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert len(pb_grpc.RecommenderServiceStub(channel).Recommend(request(2), timeout=10).items) == 3
    finally:
        loading.set()
        server.stop()


def test_concurrent_load_forms_batches_larger_than_one(artifact):
    with start(artifact, max_batch_size=16, max_queue_delay_ms=20) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        futures = [stub.Recommend.future(request(5 + i % 20), timeout=20) for i in range(48)]
        assert all(len(f.result().items) == 3 for f in futures)
        batches = metric(server, "genrec_batch_size_count")
        assert metric(server, "genrec_batch_size_sum") == 48
        assert batches < 48  # some batch held more than one request ...
        assert metric(server, 'genrec_batch_size_bucket{le="1.0"}') < batches  # ... as the histogram shows


def test_full_queue_answers_resource_exhausted(artifact):
    with start(artifact, max_batch_size=4, max_queue_delay_ms=0, max_queue_size=3) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        gate = Gate(server)
        busy = stub.Recommend.future(request(1), timeout=20)
        assert gate.entered.wait(10)  # the model thread is now held by `busy`
        queued = [stub.Recommend.future(request(2 + i), timeout=20) for i in range(3)]
        wait_until(lambda: metric(server, "genrec_queue_depth") == 3)
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(request(9), timeout=20)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.open()
        assert [len(f.result().items) for f in [busy, *queued]] == [3, 3, 3, 3]
        assert 9 not in gate.computed
        assert metric(server, 'genrec_requests_total{code="RESOURCE_EXHAUSTED",method="Recommend"}') == 1


def test_expired_deadline_is_answered_and_never_computed(artifact):
    with start(artifact, max_batch_size=4, max_queue_delay_ms=0) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        gate = Gate(server)
        busy = stub.Recommend.future(request(1), timeout=20)
        assert gate.entered.wait(10)
        for call in (stub.Recommend, lambda r, timeout: list(stub.RecommendStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(request(7), timeout=0.2)  # waits behind `busy` past its deadline
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open()
        assert len(busy.result().items) == 3
        assert len(stub.Recommend(request(4), timeout=10).items) == 3
        assert gate.computed == [1, 4]  # the expired requests (length 7) never reached the model
        assert metric(server, 'genrec_requests_total{code="DEADLINE_EXCEEDED",method="Recommend"}') == 1
        assert metric(server, 'genrec_requests_total{code="DEADLINE_EXCEEDED",method="RecommendStream"}') == 1


def test_batcher_fails_expired_requests_without_computing_them():
    """The batcher's own check, for a deadline that passes while the request waits in its queue."""
    computed: list[int] = []
    release = threading.Event()

    def compute(queries):
        release.wait(5)
        computed.extend(queries)
        return [q * 10 for q in queries]

    async def scenario():
        batcher = DynamicBatcher(compute, BatcherConfig(max_batch_size=8, max_queue_delay_ms=0, max_queue_size=2))
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # `first` is on the model thread now
        late = asyncio.ensure_future(batcher.submit(2, timeout=0.05))
        on_time = asyncio.ensure_future(batcher.submit(3, timeout=30))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.submit(4)
        await asyncio.sleep(0.1)  # `late`'s deadline passes while it waits
        release.set()
        results = await asyncio.gather(first, late, on_time, return_exceptions=True)
        await batcher.close()
        return results

    first, late, on_time = asyncio.run(scenario())
    assert (first, on_time) == (10, 30)
    assert isinstance(late, DeadlineExpired)
    assert computed == [1, 3]


def test_batcher_skips_requests_that_cannot_finish_in_time():
    """Once a batch is known to take ~0.2 s, a request with less time left is answered at once rather
    than computed too late, while its batch-mates are computed."""
    computed: list[float] = []

    def compute(queries):
        time.sleep(0.2)
        computed.extend(queries)
        return queries

    async def scenario():
        batcher = DynamicBatcher(compute, BatcherConfig(max_batch_size=8, max_queue_delay_ms=30))
        await batcher.start()
        await batcher.submit(0.0)  # measures the batch time
        results = await asyncio.gather(batcher.submit(1.0, timeout=0.1), batcher.submit(2.0, timeout=5),
                                       return_exceptions=True)
        await batcher.close()
        return results

    hurried, patient = asyncio.run(scenario())
    assert isinstance(hurried, DeadlineExpired) and patient == 2.0
    assert computed == [0.0, 2.0]


def test_a_failing_batch_fails_only_the_poisoned_request():
    def compute(queries):
        if any(q < 0 for q in queries):
            raise ValueError("poisoned")
        return [q + 1 for q in queries]

    async def scenario():
        batcher = DynamicBatcher(compute, BatcherConfig(max_batch_size=8, max_queue_delay_ms=50))
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(q) for q in (1, -1, 2)), return_exceptions=True)
        await batcher.close()
        return results

    ok1, bad, ok2 = asyncio.run(scenario())
    assert (ok1, ok2) == (2, 3) and isinstance(bad, ValueError)


def test_graceful_shutdown_finishes_in_flight_requests_and_goes_not_serving(artifact):
    server = start(artifact, max_batch_size=4, max_queue_delay_ms=0)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                              timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            gate = Gate(server)
            computing = stub.Recommend.future(request(1), timeout=30)
            assert gate.entered.wait(10)
            queued = stub.Recommend.future(request(2), timeout=30)
            wait_until(lambda: metric(server, "genrec_queue_depth") == 1)

            stopping = server.submit(server.server.shutdown(grace_s=20))
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:  # no new requests once shutdown began
                stub.Recommend(request(3), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not stopping.done()  # still waiting for the two in flight

            gate.open()
            assert len(computing.result().items) == 3 and len(queued.result().items) == 3
            stopping.result(timeout=20)
            assert gate.computed == [1, 2]
            with pytest.raises(grpc.RpcError):  # the watch stream ends with the server
                next(watch)
    finally:
        server.stop()


def test_shutdown_cancels_what_outlives_the_grace_period(artifact):
    server = start(artifact, max_batch_size=4, max_queue_delay_ms=0)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            gate = Gate(server)
            stuck = stub.Recommend.future(request(1), timeout=30)
            assert gate.entered.wait(10)
            started = time.monotonic()
            server.call(server.server.shutdown(grace_s=0.3))
            assert time.monotonic() - started < 5
            assert stuck.exception(timeout=5).code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            gate.open()
    finally:
        server.stop()


def test_queue_delay_bounds_the_wait_at_low_load(artifact):
    """A lone request is not held for a batch that never fills: it waits at most the queue delay."""
    with start(artifact, max_batch_size=64, max_queue_delay_ms=50) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        stub.Recommend(request(3), timeout=10)
        latencies = []
        for _ in range(3):
            t0 = time.perf_counter()
            stub.Recommend(request(3), timeout=10)
            latencies.append(time.perf_counter() - t0)
        assert 0.045 < float(np.median(latencies)) < 1.0


def test_continue_computes_the_next_item_in_the_next_batch_for_the_same_caller():
    """A chained item (a long prefill's next chunk) skips the queue and waits for no company."""
    from serving.work import Continue

    batches: list[list] = []

    def compute(items):
        batches.append(list(items))
        return [Continue(x - 1) if isinstance(x, int) and x > 0 else f"done {x}" for x in items]

    async def main():
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=4, max_queue_delay_ms=1000))
        await b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await asyncio.gather(b.submit(3), b.submit("a"), b.submit("b"), b.submit("c"))
        elapsed = loop.time() - t0
        await b.close()
        return first, elapsed

    results, elapsed = asyncio.run(main())
    assert results == ["done 0", "done a", "done b", "done c"]
    assert batches == [[3, "a", "b", "c"], [2], [1], [0]]
    assert elapsed < 0.5  # the full first batch went at once, and no continuation waited out the 1 s delay


def test_follow_ups_of_admitted_requests_are_not_refused_for_a_full_queue():
    """A generation's next step must not be refused halfway through its stream."""
    from serving.batcher import QueueFull

    gate, order = threading.Event(), []

    def compute(items):
        gate.wait(5)
        order.extend(items)
        return list(items)

    async def main():
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1))
        await b.start()
        running = asyncio.create_task(b.submit("running"))  # on the model thread, held by the gate
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(b.submit("queued"))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit("refused")
        follow = asyncio.create_task(b.submit("follow-up", follow_up=True))
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(running, queued, follow)
        await b.close()
        return results

    assert asyncio.run(main()) == ["running", "queued", "follow-up"]
    assert order == ["running", "follow-up", "queued"]  # computed ahead of requests not yet started


def test_a_follow_up_wakes_an_idle_batcher():
    async def main():
        b = DynamicBatcher(lambda items: [f"done {x}" for x in items], BatcherConfig(max_queue_delay_ms=1000))
        await b.start()
        await asyncio.sleep(0.01)  # the loop now waits for a first request
        result = await asyncio.wait_for(b.submit("next step", follow_up=True), timeout=0.5)
        await b.close()
        return result

    assert asyncio.run(main()) == "done next step"


def test_close_answers_the_callers_of_the_batch_in_flight():
    gate = threading.Event()

    def compute(items):
        gate.wait(5)
        return list(items)

    async def main():
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=2, max_queue_delay_ms=0))
        await b.start()
        computing = asyncio.create_task(b.submit("computing"))  # no deadline
        await asyncio.sleep(0.05)
        await b.close()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(computing, timeout=1)

    asyncio.run(main())


# --- issue #20: generations must neither block shutdown nor starve other requests ----------------
def steps_forever(batcher: DynamicBatcher, stop: asyncio.Event) -> asyncio.Task:
    """A generation: one follow-up step after another until ``stop``, as ``Generate`` submits them."""
    async def run() -> None:
        while not stop.is_set():
            await batcher.submit("step", follow_up=True)

    return asyncio.create_task(run())


def test_close_with_generation_steps_queued_cancels_them_and_returns():
    """Issue #20, 1: close() met the wake-up placeholders that generation steps left in the queue,
    raised AttributeError and never finished, so SIGTERM hung while Generate streams were active."""
    def compute(items):
        time.sleep(0.002)
        return list(items)

    async def main():
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=2, max_queue_delay_ms=0))
        await b.start()
        stop = asyncio.Event()
        generations = [steps_forever(b, stop) for _ in range(8)]  # more than a batch holds
        await asyncio.sleep(0.2)
        await asyncio.wait_for(b.close(), timeout=2)
        done, _ = await asyncio.wait(generations, timeout=2)
        return [t.cancelled() or isinstance(t.exception(), asyncio.CancelledError) for t in done], len(generations)

    ended, total = asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert len(ended) == total and all(ended)


def test_generation_steps_neither_fill_the_queue_nor_starve_new_requests():
    """Issue #20, 2: with more generations in flight than a batch holds, their steps filled every
    batch and their wake-up placeholders counted toward max_queue_size, so new requests were refused
    (QueueFull) or waited forever. Now a new request is admitted and computed within a few batches."""
    batches: list[list] = []

    def compute(items):
        time.sleep(0.002)
        batches.append(list(items))
        return list(items)

    async def main():
        b = DynamicBatcher(compute, BatcherConfig(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=4))
        await b.start()
        stop = asyncio.Event()
        generations = [steps_forever(b, stop) for _ in range(12)]
        await asyncio.sleep(0.2)
        answers = []
        for i in range(10):
            b.admit(1.0)  # raises QueueFull if the steps took the queue's room
            answers.append(await asyncio.wait_for(b.submit(f"request {i}", timeout=1.0), timeout=1.0))
        stop.set()
        await asyncio.gather(*generations)
        await b.close()
        return answers

    answers = asyncio.run(asyncio.wait_for(main(), timeout=20))
    assert answers == [f"request {i}" for i in range(10)]
    # Every batch that took a request still advanced generations: neither kind waits for the other.
    mixed = [batch for batch in batches if any(x != "step" for x in batch)]
    assert mixed and all("step" in batch for batch in mixed)
