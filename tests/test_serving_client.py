"""The command-line client against a real server on a free port, on an export keyed by titles with
commas (as the ML-1M fallback data is): events and items of any title, --search (SearchItems), and
the result table."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pandas as pd
import pytest

from benchmarks.random_export import make_random_artifact
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.catalogue import Catalogue
from serving.client import format_table
from serving.client import main as client_main
from serving.server import ServerConfig
from tests.serving_fixtures import ServerThread

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


def client(server: ServerThread, *args: str) -> int:
    return client_main(["--address", server.address, *args])


def rows(out: str) -> list[str]:
    """The table's item rows: those that start with a rank and a score."""
    return [line for line in out.splitlines() if re.match(r"^\s+\d+\s+-?\d\.\d{4}  ", line)]


# --- A: items that a person can type --------------------------------------------------------------
def test_titles_with_commas_and_at_signs_pass_as_history(server, stub, capsys):
    assert client(server, "--history", f"{MATRIX}@978300760", f"{STARS}@978300800", "--top-k", "4") == 0
    printed = [line.split("  ")[-1] for line in rows(capsys.readouterr().out)]
    history = [pb.Event(item_id=MATRIX, timestamp=978300760), pb.Event(item_id=STARS, timestamp=978300800)]
    direct = stub.Recommend(pb.RecommendRequest(history=history, top_k=4), timeout=10)
    assert printed == [item.item_id for item in direct.items]


def test_titles_with_commas_pass_as_appended_events_and_item_lists(server, stub, capsys):
    before = stub.Recommend(pb.RecommendRequest(user_id="1", top_k=1), timeout=10).history_length
    assert client(server, "--user", "1", "--append", f"{SHAWSHANK}@4000000000", f"{MATRIX}@4000000060",
                  "--candidates", STARS, "Toy Story (1995)", "--exclude", "Toy Story (1995)") == 0
    captured = capsys.readouterr()
    assert f"now has {before + 2} events" in captured.err
    assert [line.split("  ")[-1] for line in rows(captured.out)] == [STARS]


@pytest.mark.parametrize(("word", "reason"), [
    ("1193@978300760,661@978302109", "give each as its own word"),  # the comma list this client once took
    (MATRIX, "is not ITEM@TIMESTAMP"),
    (f"{MATRIX}@yesterday", "'yesterday' is not a timestamp"),
])
def test_a_malformed_event_is_refused_by_the_client(word, reason, capsys):
    with pytest.raises(SystemExit) as exit_:
        client_main(["--address", "127.0.0.1:1", "--history", word])
    assert exit_.value.code == 2 and reason in capsys.readouterr().err


def test_search_lists_matching_ids_and_titles(server, capsys):
    assert client(server, "--search", "the (19") == 0
    out = capsys.readouterr().out
    assert rows_of_search(out) == [MATRIX, SHAWSHANK]
    assert "2 of 2 matching items" in out
    assert client(server, "--search", "PART 1", "--top-k", "3") == 0
    out = capsys.readouterr().out
    assert len(rows_of_search(out)) == 3 and "3 of 9 matching items (--top-k shows more)" in out
    assert client(server, "--search", "no such film") == 0
    assert capsys.readouterr().out == "no item's id or title contains that text\n"


def rows_of_search(out: str) -> list[str]:
    return out.splitlines()[1:-1]  # between the header and the count


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
    catalogue = Catalogue(items)
    assert catalogue.search("1", 10) == ([3, 1, 2, 4], 4)
    assert catalogue.search("1", 2) == ([3, 1], 4)
    assert catalogue.search("SEVEN", 10) == ([4], 1)


# --- D: the result table ----------------------------------------------------------------------------
def test_table_shows_a_title_keyed_item_once(server, capsys):
    assert client(server, "--user", "2", "--top-k", "5") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rank", "score", "item"]
    for line in rows(out):
        title = line.split("  ")[-1]
        assert title in TITLES and line.count(title) == 1, line
    assert client(server, "--user", "2", "--generate", "3", "--temperature", "1", "--seed", "7") == 0
    generated = rows(capsys.readouterr().out)
    assert len(generated) == 3 and all(line.count(line.split("  ")[-1]) == 1 for line in generated)


def test_table_aligns_ids_of_any_width_and_their_titles():
    items = [pb.ScoredItem(item_id=i, score=s, title=t) for i, s, t in
             [("7", 0.91, "Seven (1995)"), ("123456789012", 0.5, "Long id"), ("1193", -0.25, "One Flew Over")]]
    lines = format_table([pb.RecommendResponse(items=items, model_version="v")]).splitlines()
    columns = {line.index(word) for line, word in zip(lines, ["item", "7", "123456789012", "1193"], strict=False)}
    assert len(columns) == 1, lines  # the ids start in one column...
    titles = {line.index(word) for line, word in zip(lines, ["title", "Seven", "Long", "One"], strict=False)}
    assert len(titles) == 1, lines  # ...and so do the titles
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"] and lines[-1] == "model v"
    assert np.allclose([float(line.split()[1]) for line in lines[1:4]], [0.91, 0.5, -0.25])
