"""The RPCs against a real server on a free localhost port: answers, train/serve parity, bad input,
health, reflection and metrics."""

from __future__ import annotations

import math
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from benchmarks.random_export import START_TIME, make_random_artifact, raw_item_id
from data.batch import SeqBatch
from models.recommender import score_items
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.artifact import load_artifact
from serving.server import SERVICE_NAME, ServerConfig
from tests.serving_fixtures import ServerThread

NUM_ITEMS = 60
MAX_LEN = 32  # make_random_artifact's default model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, path = make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=NUM_ITEMS,
                                       num_users=8)
    config = ServerConfig(artifact=path, port=0, metrics_port=0)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        yield model, load_artifact(path), server, channel


@pytest.fixture
def stub(setup):
    return pb_grpc.RecommenderServiceStub(setup[3])


def dense(raw: str) -> int:
    return int(raw) - 1000


def events(items, start=START_TIME):
    return [pb.Event(item_id=raw_item_id(i), timestamp=start + 60 * n) for n, i in enumerate(items)]


def stored_history(artifact, user: str) -> tuple[list[int], list[int]]:
    items, stamps = artifact.histories.get(user)
    return items.tolist(), stamps.tolist()


@torch.no_grad()
def offline_scores(model, items: list[int], stamps: list[int]) -> torch.Tensor:
    """[num_items + 1] scores from the training model itself (TorchRec collection, encode, embed_items)."""
    users = model.encode(SeqBatch.from_sequences([items[-MAX_LEN:]], [stamps[-MAX_LEN:]]))
    return score_items(users, model.embed_items(torch.arange(NUM_ITEMS + 1)))[0]


def assert_matches_offline(response, expected: torch.Tensor, eligible: list[int], top_k: int):
    ids = [dense(item.item_id) for item in response.items]
    scores = torch.tensor([item.score for item in response.items])
    want = torch.topk(expected[eligible], min(top_k, len(eligible)))
    assert ids == [eligible[i] for i in want.indices.tolist()]
    torch.testing.assert_close(scores, want.values, atol=1e-5, rtol=1e-5)


# --- answers -------------------------------------------------------------------------------------
def test_known_user_by_id_alone_matches_offline_model(setup, stub):
    model, artifact, _, _ = setup
    items, stamps = stored_history(artifact, "3")
    response = stub.Recommend(pb.RecommendRequest(user_id="3", top_k=7), timeout=10)
    assert len(response.items) == 7 and response.model_version == artifact.version
    assert response.history_length == len(items)
    assert all(item.title == f"Item {dense(item.item_id)}" for item in response.items)
    eligible = [i for i in range(1, NUM_ITEMS + 1) if i not in set(items)]
    assert_matches_offline(response, offline_scores(model, items, stamps), eligible, 7)


def test_concurrent_requests_batched_together_keep_parity(setup, stub):
    """Requests of different lengths computed in one batch give each its own offline scores."""
    model, artifact, _, _ = setup
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=n).tolist() for n in (1, 3, 17, 32, 45, 9, 2, 30)]
    futures = [stub.Recommend.future(pb.RecommendRequest(history=events(h), top_k=5), timeout=10)
               for h in histories]
    for h, future in zip(histories, futures, strict=True):
        stamps = [START_TIME + 60 * n for n in range(len(h))]
        response = future.result()
        assert response.history_length == min(len(h), MAX_LEN)  # longer ones use the most recent 32
        eligible = [i for i in range(1, NUM_ITEMS + 1) if i not in set(h)]
        assert_matches_offline(response, offline_scores(model, h, stamps), eligible, 5)


def test_known_user_with_new_events_appends_them(setup, stub):
    model, artifact, _, _ = setup
    items, stamps = stored_history(artifact, "5")
    new = [pb.Event(item_id=raw_item_id(7), timestamp=stamps[-1] + 10),
           pb.Event(item_id=raw_item_id(8), timestamp=stamps[-1] + 20.9)]  # fractions: whole seconds used
    response = stub.Recommend(pb.RecommendRequest(user_id="5", history=new, top_k=4), timeout=10)
    items, stamps = items + [7, 8], stamps + [stamps[-1] + 10, stamps[-1] + 20]
    eligible = [i for i in range(1, NUM_ITEMS + 1) if i not in set(items)]
    assert_matches_offline(response, offline_scores(model, items, stamps), eligible, 4)


def test_stream_sends_the_unary_top_k_in_chunks(stub):
    request = pb.RecommendRequest(user_id="2", top_k=11, chunk_size=4)
    chunks = list(stub.RecommendStream(request, timeout=10))
    assert [len(c.items) for c in chunks] == [4, 4, 3]
    assert [c.offset for c in chunks] == [0, 4, 8]
    unary = stub.Recommend(request, timeout=10)
    assert [i for c in chunks for i in c.items] == list(unary.items)


def test_ranking_mode_scores_only_the_candidates(setup, stub):
    model, artifact, _, _ = setup
    items, stamps = stored_history(artifact, "1")
    candidates = [items[0], 5, 9, 13, 5, 21]  # a history item is kept; the duplicate is scored once
    request = pb.RecommendRequest(user_id="1", top_k=10, candidate_item_ids=[raw_item_id(i) for i in candidates],
                                  exclude_item_ids=[raw_item_id(13)])
    response = stub.Recommend(request, timeout=10)
    eligible = [items[0], 5, 9, 21]
    assert_matches_offline(response, offline_scores(model, items, stamps), eligible, 10)


def test_retrieval_never_returns_history_exclude_or_padding(setup, stub):
    _, artifact, _, _ = setup
    items, _ = stored_history(artifact, "4")
    exclude = [1, 2, 3]
    response = stub.Recommend(pb.RecommendRequest(user_id="4", top_k=NUM_ITEMS,
                                                  exclude_item_ids=[raw_item_id(i) for i in exclude]), timeout=10)
    returned = [dense(i.item_id) for i in response.items]
    assert sorted(returned) == sorted(set(range(1, NUM_ITEMS + 1)) - set(items) - set(exclude))
    assert all(math.isfinite(i.score) for i in response.items)


# --- bad input -----------------------------------------------------------------------------------
def nan_event():
    return pb.Event(item_id=raw_item_id(1), timestamp=float("nan"))


BAD_REQUESTS = {
    "empty request": (pb.RecommendRequest(), "request"),
    "top_k zero": (pb.RecommendRequest(user_id="1", top_k=0), "top_k"),
    "top_k negative": (pb.RecommendRequest(user_id="1", top_k=-3), "top_k"),
    "top_k above catalogue": (pb.RecommendRequest(user_id="1", top_k=NUM_ITEMS + 1), "top_k"),
    "unknown user, no history": (pb.RecommendRequest(user_id="stranger", top_k=5), "user_id"),
    "no user, no history": (pb.RecommendRequest(top_k=5), "history"),
    "unknown history item": (pb.RecommendRequest(history=[pb.Event(item_id="999999", timestamp=1)], top_k=5),
                             "history[0].item_id"),
    "dense id instead of raw": (pb.RecommendRequest(history=events([1]) + [pb.Event(item_id="3", timestamp=2e9)],
                                                    top_k=5), "history[1].item_id"),
    "empty item id": (pb.RecommendRequest(history=[pb.Event(item_id="", timestamp=1)], top_k=5),
                      "history[0].item_id"),
    "unknown exclude": (pb.RecommendRequest(user_id="1", top_k=5, exclude_item_ids=["x"]), "exclude_item_ids[0]"),
    "unknown candidate": (pb.RecommendRequest(user_id="1", top_k=5, candidate_item_ids=[raw_item_id(2), "y"]),
                          "candidate_item_ids[1]"),
    "timestamps out of order": (pb.RecommendRequest(history=events([1, 2, 3])[::-1], top_k=5),
                                "history[1].timestamp"),
    "timestamp NaN": (pb.RecommendRequest(history=events([1]) + [nan_event()], top_k=5), "history[1].timestamp"),
    "timestamp infinite": (pb.RecommendRequest(history=[pb.Event(item_id=raw_item_id(1), timestamp=math.inf)],
                                               top_k=5), "history[0].timestamp"),
    "timestamp negative": (pb.RecommendRequest(history=[pb.Event(item_id=raw_item_id(1), timestamp=-5)], top_k=5),
                           "history[0].timestamp"),
    "event older than stored history": (pb.RecommendRequest(user_id="1", history=events([1], start=0), top_k=5),
                                        "history[0].timestamp"),
    "negative chunk size": (pb.RecommendRequest(user_id="1", top_k=5, chunk_size=-1), "chunk_size"),
    "too many history events": (pb.RecommendRequest(history=events([1] * 10_001), top_k=5), "history"),
    "too many exclude ids": (pb.RecommendRequest(user_id="1", top_k=5, exclude_item_ids=[raw_item_id(1)] * 10_001),
                             "exclude_item_ids"),
    "oversized message": (pb.RecommendRequest(user_id="1", top_k=5, candidate_item_ids=["z" * 200_000] * 6),
                          "request"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(stub, name):
    request, field = BAD_REQUESTS[name]
    for call in (stub.Recommend, lambda r, timeout: list(stub.RecommendStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(field + ":"), info.value.details()
    # ... and the server answers a good request right after.
    assert len(stub.Recommend(pb.RecommendRequest(user_id="1", top_k=3), timeout=10).items) == 3


def test_bad_requests_do_not_disturb_good_ones_in_flight(stub):
    requests = [BAD_REQUESTS[name][0] for name in BAD_REQUESTS] + [pb.RecommendRequest(user_id="2", top_k=3)] * 20
    futures = [stub.Recommend.future(r, timeout=10) for r in requests]
    codes = [f.code() for f in futures]
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == len(BAD_REQUESTS)
    assert codes.count(grpc.StatusCode.OK) == 20


def test_message_above_the_transport_limit_is_refused_and_server_survives(stub):
    huge = pb.RecommendRequest(user_id="1", top_k=5, candidate_item_ids=["z" * 1_000_000] * 5)
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(huge, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Recommend(pb.RecommendRequest(user_id="1", top_k=3), timeout=10).items) == 3


# --- health, reflection, metrics -----------------------------------------------------------------
def test_health_is_serving_for_the_server_and_the_service(setup):
    health = health_pb2_grpc.HealthStub(setup[3])
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(setup):
    reflection = reflection_pb2_grpc.ServerReflectionStub(setup[3])
    [response] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5)
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_requests_by_status(setup, stub):
    server = setup[2]
    stub.Recommend(pb.RecommendRequest(user_id="1", top_k=2), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Recommend(pb.RecommendRequest(user_id="1", top_k=0), timeout=10)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'genrec_requests_total{code="OK",method="Recommend"}' in text
    assert 'genrec_requests_total{code="INVALID_ARGUMENT",method="Recommend"}' in text
    for name in ("request_latency_seconds", "queue_latency_seconds", "compute_latency_seconds", "batch_size"):
        assert f"genrec_{name}_count" in text
