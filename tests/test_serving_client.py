"""SearchItems against a real server on a free port, on an export keyed by titles with commas (as the
ML-1M fallback data is)."""

from __future__ import annotations

import grpc
import pandas as pd
import pytest

from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.catalogue import Catalogue
from serving.server import ServerConfig
from serving.testing import ServerThread, make_random_artifact

MATRIX, STARS, SHAWSHANK = "Matrix, The (1999)", "Stars @ Night, The (2001)", "Shawshank Redemption, The (1994)"
TITLES = [MATRIX, STARS, SHAWSHANK, "Toy Story (1995)", *(f"Film {i}, Part {i % 3} ({1950 + i})" for i in range(26))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _, path = make_random_artifact(tmp_path_factory.mktemp("titled") / "export", num_items=len(TITLES),
                                   num_users=3, titles_as_ids=TITLES)
    with ServerThread(ServerConfig(artifact=path, port=0)) as server:
        yield server


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


def test_search_rpc_is_case_insensitive_and_bounded(stub):
    reply = stub.SearchItems(pb.SearchItemsRequest(query="mAtRiX"), timeout=10)
    assert [(i.item_id, i.title) for i in reply.items] == [(MATRIX, MATRIX)] and reply.total_matches == 1
    reply = stub.SearchItems(pb.SearchItemsRequest(query="film"), timeout=10)
    assert len(reply.items) == 20 and reply.total_matches == 26  # limit 0 picks 20
    assert not stub.SearchItems(pb.SearchItemsRequest(query="no such film"), timeout=10).items


@pytest.mark.parametrize(("request_", "field"), [
    (pb.SearchItemsRequest(), "query"),
    (pb.SearchItemsRequest(query="x" * 201), "query"),
    (pb.SearchItemsRequest(query="film", limit=-1), "limit"),
    (pb.SearchItemsRequest(query="film", limit=1001), "limit"),
])
def test_bad_search_is_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.SearchItems(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":")


def test_search_puts_the_item_whose_id_is_the_query_first():
    """Numeric ids: "1" is a substring of many others, and the one it names comes first."""
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "raw_item": ["11", "21", "1", "7"],
                          "title": ["Eleven", "Twenty-one", "One", "Seven (1971)"]})
    catalogue = Catalogue(items, pd.DataFrame({"user_id": [], "item_ids": [], "timestamps": []}))
    assert catalogue.search("1", 10) == ([3, 1, 2, 4], 4)
    assert catalogue.search("1", 2) == ([3, 1], 4)
    assert catalogue.search("SEVEN", 10) == ([4], 1)
