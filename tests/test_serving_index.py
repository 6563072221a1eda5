"""The item index (``serving.index``): approximate retrieval against an exact answer computed here in
numpy, exclusions, ranking requests, and a server started with ``--index ivf``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from benchmarks.catalogue import Synthetic, recall
from benchmarks.random_export import make_random_artifact, raw_item_id
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.artifact import load_artifact
from serving.engine import Engine
from serving.index import IndexConfig, IndexKind, build_index
from serving.server import ServerConfig
from serving.work import Query
from tests.serving_fixtures import ServerThread

ROOT = Path(__file__).resolve().parents[1]


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    rows = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    rows[0] = 0  # the padding row, as l2_normalize leaves a zero row
    return rows


def reference(vectors: torch.Tensor, user: torch.Tensor, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact answer, independently of serving.index: float64 dot products, padding and exclusions
    removed, best k."""
    scores = vectors.double().numpy() @ user.double().numpy()
    allowed = np.setdiff1d(np.arange(1, len(vectors)), exclude)
    best = allowed[np.argsort(-scores[allowed], kind="stable")[:k]]
    return best, scores[best]


def excludes_for(vectors: torch.Tensor, users: torch.Tensor, rng: np.random.Generator, n_random: int
                 ) -> list[np.ndarray]:
    """Each user excludes its 10 best items (so exclusion changes the answer) and ``n_random`` others."""
    out = []
    for u in users:
        best, _ = reference(vectors, u, 10, np.zeros(0, dtype=np.int64))
        out.append(np.union1d(best, rng.integers(1, len(vectors), size=n_random)))
    return out


CONFIGS = {
    # Search every cell / the whole graph: the shortlist is then the true best, so the answer is exact.
    "ivf-exhaustive": IndexConfig(IndexKind.IVF, nlist=8, nprobe=8, shortlist=64),
    "hnsw-exhaustive": IndexConfig(IndexKind.HNSW, hnsw_ef_search=500, shortlist=64),
    # A shortlist as large as the catalogue: scored whole, whatever the index would have proposed.
    "ivf-whole-shortlist": IndexConfig(IndexKind.IVF, nlist=8, nprobe=1, shortlist=500),
    "hnsw-whole-shortlist": IndexConfig(IndexKind.HNSW, hnsw_ef_search=1, shortlist=500),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_equals_exact_when_the_index_searches_the_whole_catalogue(name):
    vectors = unit_rows(501, 16, seed=1)
    users = unit_rows(9, 16, seed=2)[1:]
    excludes = excludes_for(vectors, users, np.random.default_rng(0), 40)
    ks = [1, 10, 25, 100, 5, 50, 10, 30]
    index = build_index(vectors, CONFIGS[name])
    for (items, scores), user, k, exclude in zip(index.search(users, ks, excludes), users, ks, excludes, strict=True):
        want, want_scores = reference(vectors, user, k, exclude)
        assert items.tolist() == want.tolist()
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
        assert items.dtype == np.int64 and scores.dtype == np.float32


def test_the_exact_index_is_the_reference_answer():
    vectors = unit_rows(301, 8, seed=3)
    users = unit_rows(5, 8, seed=4)[1:]
    excludes = excludes_for(vectors, users, np.random.default_rng(1), 20)
    for (items, scores), user, exclude in zip(build_index(vectors, IndexConfig()).search(users, [20] * 4, excludes),
                                              users, excludes, strict=True):
        want, want_scores = reference(vectors, user, 20, exclude)
        assert items.tolist() == want.tolist()
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def clustered():
    """50K items around 100 centres (500 each on average) and 64 users near a centre; the exact top 100."""
    synthetic = Synthetic(50_000, dim=32, centres=100)
    vectors, users = synthetic.item_vectors(), synthetic.users(64)
    excludes = synthetic.excludes(64, 20)
    truth = [items for items, _ in build_index(vectors, IndexConfig()).search(users, [100] * 64, excludes)]
    for t, user, exclude in zip(truth[:4], users, excludes, strict=False):  # the exact index is exact
        assert t.tolist() == reference(vectors, user, 100, exclude)[0].tolist()
    return vectors, users, excludes, truth


RECALL_FLOOR = 0.9


@pytest.mark.parametrize("kind", [IndexKind.IVF, IndexKind.HNSW])
def test_recall_at_100_with_the_default_knobs(clustered, kind):
    vectors, users, excludes, truth = clustered
    index = build_index(vectors, IndexConfig(kind))
    found = index.search(users, [100] * len(users), excludes)
    assert all(len(items) == 100 for items, _ in found)
    assert recall([items for items, _ in found], truth) >= RECALL_FLOOR
    for (items, scores), user in zip(found, users, strict=True):  # re-scored exactly, best first
        np.testing.assert_allclose(scores, vectors[items].double().numpy() @ user.double().numpy(), atol=1e-5)
        assert np.all(np.diff(scores) <= 0)


@pytest.mark.parametrize("kind", [IndexKind.IVF, IndexKind.HNSW])
def test_exclusions_are_honoured_and_k_items_come_back_when_the_catalogue_has_them(kind):
    """Small shortlists, users that exclude most of the catalogue or their own best items: never an
    excluded id nor the padding row, and min(k, items left) distinct items, best first, scored exactly."""
    vectors = unit_rows(2001, 16, seed=5)
    users = unit_rows(7, 16, seed=6)[1:]
    rng = np.random.default_rng(2)
    excludes = [
        np.zeros(0, dtype=np.int64),
        reference(vectors, users[1], 300, np.zeros(0, dtype=np.int64))[0],  # its 300 best
        np.sort(rng.choice(np.arange(1, 2001), size=1900, replace=False)),  # 100 left, k = 150
        np.arange(1, 2001)[np.arange(1, 2001) != 777],  # one item left
        np.sort(rng.choice(np.arange(1, 2001), size=1500, replace=False)),
        np.arange(1, 1001),  # the first half
    ]
    ks = [40, 40, 150, 10, 400, 200]
    knobs = {"nlist": 32, "nprobe": 1} if kind is IndexKind.IVF else {"hnsw_ef_search": 16}
    index = build_index(vectors, IndexConfig(kind, shortlist=16, **knobs))
    for (items, scores), k, exclude, user in zip(index.search(users, ks, excludes), ks, excludes, users, strict=True):
        assert len(items) == min(k, 2000 - len(exclude))
        assert len(set(items.tolist())) == len(items)
        assert 0 not in items and not np.isin(items, exclude).any()
        np.testing.assert_allclose(scores, vectors[items].numpy() @ user.numpy(), rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(scores) <= 0)
    assert index.search(users[3:4], [10], excludes[3:4])[0][0].tolist() == [777]


def test_bad_knobs_are_refused_in_one_line():
    cases = [
        (IndexConfig(IndexKind.IVF, nprobe=0), "--index-nprobe must be >= 1, got 0"),
        (IndexConfig(IndexKind.IVF, nlist=8, nprobe=9), "--index-nprobe (9) must be at most --index-nlist (8)"),
        (IndexConfig(IndexKind.IVF, nlist=600), "--index-nlist (600) must be at most the number of items (500)"),
        (IndexConfig(IndexKind.EXACT, shortlist=10), "--index-shortlist applies to an approximate index"),
        (IndexConfig(IndexKind.HNSW, nprobe=4), "--index-nprobe applies to --index ivf, not --index hnsw"),
        (IndexConfig(IndexKind.IVF, hnsw_m=0), "--hnsw-m applies to --index hnsw, not --index ivf"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError) as e:
            build_index(unit_rows(501, 8, seed=0), config)
        assert message in str(e.value) and "\n" not in str(e.value)


# --- through the engine and the server -------------------------------------------------------------
NUM_ITEMS = 400
EXHAUSTIVE_IVF = IndexConfig(IndexKind.IVF, nlist=8, nprobe=8, shortlist=32)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=NUM_ITEMS, num_users=6)[1]


def query(items, top_k, exclude=(), candidates=None) -> Query:
    items = np.asarray(items, dtype=np.int64)
    return Query(items=items, timestamps=np.arange(len(items), dtype=np.int64) * 60, top_k=top_k,
                 exclude=np.union1d(items, np.asarray(exclude, dtype=np.int64)),
                 candidates=None if candidates is None else np.asarray(candidates, dtype=np.int64), chunk_size=10)


def test_engine_retrieval_through_an_index_and_ranking_requests_bypass_it(artifact):
    exact = Engine(load_artifact(artifact))
    indexed = Engine(load_artifact(artifact), index=EXHAUSTIVE_IVF)
    searched = []
    real = indexed.index.search
    indexed.index.search = lambda users, ks, excludes: searched.append(len(ks)) or real(users, ks, excludes)
    queries = [query([3, 9, 27], 10), query([5, 6], 5, candidates=[7, 70, 170, 270, 370, 1]),
               query([11, 12, 13], 20, exclude=[40, 41]), query([8], 3, candidates=[100, 200])]
    with torch.inference_mode():
        want, got = exact.compute(queries), indexed.compute(queries)
        every = exact.compute([query([5, 6], NUM_ITEMS - 2)])[0]  # the ranking user's scores of every item
    assert searched == [2]  # the two retrieval queries in one call; the candidates never reach the index
    for w, g in zip(want, got, strict=True):
        assert g.items.tolist() == w.items.tolist() and g.history_length == w.history_length
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-6)
    assert not np.isin(got[2].items, [11, 12, 13, 40, 41]).any()
    # A candidate's score is its score in retrieval, and the candidates come best first.
    scores = dict(zip(every.items.tolist(), every.scores.tolist(), strict=True))
    want_order = sorted([1, 7, 70, 170, 270, 370], key=lambda i: -scores[i])[:5]
    assert got[1].items.tolist() == want_order
    np.testing.assert_allclose(got[1].scores, [scores[i] for i in want_order], rtol=1e-5, atol=1e-6)


def test_a_server_with_an_ivf_index_answers_recommend_as_the_exact_one(artifact):
    with (ServerThread(ServerConfig(artifact=artifact, port=0)) as plain,
          ServerThread(ServerConfig(artifact=artifact, port=0, index=EXHAUSTIVE_IVF)) as ivf,
          grpc.insecure_channel(plain.address) as cp, grpc.insecure_channel(ivf.address) as ci):
        assert ivf.server.engine.index.kind is IndexKind.IVF
        exact, approx = pb_grpc.RecommenderServiceStub(cp), pb_grpc.RecommenderServiceStub(ci)
        excluded, candidates = [raw_item_id(i) for i in (1, 2, 3)], [raw_item_id(i) for i in (9, 99)]
        for request in (pb.RecommendRequest(user_id="2", top_k=25),
                        pb.RecommendRequest(user_id="4", top_k=5, exclude_item_ids=excluded),
                        pb.RecommendRequest(user_id="1", top_k=3, candidate_item_ids=candidates)):
            a, b = exact.Recommend(request, timeout=20), approx.Recommend(request, timeout=20)
            assert [i.item_id for i in b.items] == [i.item_id for i in a.items]
            assert len(b.items) == (2 if request.candidate_item_ids else request.top_k)
            assert [i.score for i in b.items] == pytest.approx([i.score for i in a.items], rel=1e-5, abs=1e-6)


def test_a_process_started_with_index_ivf_serves_and_logs_its_index(artifact):
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--port", "0",
                             "--index", "ivf", "--index-nlist", "16", "--index-nprobe", "4", "--appended-events",
                             ":memory:"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "SERVING model" in line or "ERROR" in line:
                break
        built = [line for line in log if "built the ivf index" in line]
        assert built and "nlist 16, nprobe 4" in built[0] and "MiB" in built[0], "".join(log)
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(log)).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.RecommenderServiceStub(channel).Recommend(pb.RecommendRequest(user_id="1", top_k=7),
                                                                      timeout=20)
        assert len(reply.items) == 7
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize(("flags", "message"), [
    (["--index", "ivf", "--index-nprobe", "0"], "--index-nprobe must be >= 1, got 0"),
    (["--index", "exact", "--hnsw-m", "16"], "--hnsw-m applies to an approximate index"),
    (["--index", "ivf", "--index-nlist", "5000"], "--index-nlist (5000) must be at most the number of items (400)"),
])
def test_bad_index_flags_are_refused_in_one_line_before_listening(artifact, flags, message):
    proc = subprocess.run([sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--port", "0", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "listening" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    [error] = proc.stderr.strip().splitlines()
    assert message in error, proc.stderr


def test_an_unknown_index_kind_is_refused_by_the_command_line(artifact):
    proc = subprocess.run([sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--index", "annoy"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --index: invalid choice: 'annoy'" in proc.stderr, proc.stderr
