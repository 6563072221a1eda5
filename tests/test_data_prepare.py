"""Preprocessing (drops, stable sort, dense ids), the prepared files and the CLI."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import movielens_1m
from data import prepare as prepare_module
from data.formats import Columns, FileSource, MalformedFileError, ReadOptions
from data.interactions import Interactions
from data.manifest import FORMAT_VERSION, Manifest
from data.prepare import DatasetSpec, PreparedDataset, prepare, summary_line
from data.streaming import EmptyDatasetError, KCore, build
from data.synthetic import EventFileConfig, SyntheticConfig, write_event_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SLICE = FIXTURES / "ml-latest-small"


def interactions_of(rows: list[tuple], source: str = "test") -> Interactions:
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    frame = frame.astype({"timestamp": "int64", "rating": "float64"})
    return Interactions(frame, source=source, path=None, checksum="0" * 64)


def as_lists(dataset: PreparedDataset) -> dict[object, list[int]]:
    """raw user -> that user's items as raw ids, oldest first."""
    raw_item = dataset.items.set_index("item_id")["raw_item"]
    return {
        row.raw_user: raw_item[row.item_ids].tolist() for row in dataset.sequences.itertuples(index=False)
    }


# --- preprocessing rules ------------------------------------------------------------------------
def test_dat_fixture_drops_sorts_and_indexes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ds = PreparedDataset.from_interactions(FileSource(FIXTURES / "formats" / "movielens-dat").load(), "dat")
    m = ds.manifest
    assert m.raw_counts == (10, 4, 4)
    assert (m.dropped.duplicate_rows, m.dropped.short_users, m.dropped.short_user_events) == (1, 1, 1)
    assert m.counts == (8, 3, 3)
    assert "dropped 1 exact duplicate rows" in caplog.text
    assert "dropped 1 users with fewer than 2 events (1 events)" in caplog.text
    # Dense ids follow raw-id order; user 9 (one event) and item 40 (only user 9's) are gone.
    assert ds.raw_users.tolist() == [1, 2, 3]
    assert ds.items["raw_item"].tolist() == [10, 20, 30]
    assert ds.items["title"].tolist()[1] == "Misérables, Les (1995)"
    # User 3 rated items 30 and 10 at the same second (lines 5 and 6): file order breaks the tie.
    assert as_lists(ds) == {1: [10, 20, 20], 2: [10, 30], 3: [20, 30, 10]}
    assert ds.sequences.loc[2, "timestamps"].tolist() == [100, 300, 300]


def test_amazon_fixture_string_ids() -> None:
    amazon = FileSource(FIXTURES / "formats" / "amazon_ratings.csv").load()
    ds = PreparedDataset.from_interactions(amazon, "amazon")
    assert ds.manifest.dropped.duplicate_rows == 1  # same user, item, time *and* rating
    assert ds.manifest.dropped.short_users == 1
    # A2QRS rated 0000000002 twice in one second with different ratings: both kept, in file order.
    assert as_lists(ds) == {
        "A1XYZ": ["B00000ABCD", "0000000001"],
        "A2QRS": ["B00000ABCD", "0000000002", "0000000002"],
    }
    assert ds.items["title"].isna().all()


def test_ties_keep_file_order_against_a_reference() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    # Few distinct timestamps: most events tie with others of the same user; some rows repeat exactly.
    columns = [rng.integers(0, 40, n), rng.integers(0, 30, n), rng.integers(0, 6, n), rng.integers(1, 3, n)]
    rows = list(zip(*(c.tolist() for c in columns), strict=True))
    ds = PreparedDataset.from_interactions(interactions_of(rows), "ties")
    assert ds.manifest.dropped.duplicate_rows > 0  # so the reference below must drop them too
    seen: set[tuple] = set()
    expected: dict[int, list[int]] = {}
    for position, row in enumerate(rows):
        if row not in seen:
            seen.add(row)
            expected.setdefault(row[0], []).append(position)
    reference = {
        user: [rows[p][1] for p in sorted(positions, key=lambda p: (rows[p][2], p))]
        for user, positions in expected.items()
        if len(positions) >= 2
    }
    assert as_lists(ds) == reference


def test_dense_ids_do_not_depend_on_row_order() -> None:
    rows = [(u, i, t, 1.0) for u, i, t in [(5, 30, 1), (5, 10, 2), (7, 20, 3), (7, 30, 4), (5, 20, 5)]]
    a = PreparedDataset.from_interactions(interactions_of(rows), "a")
    b = PreparedDataset.from_interactions(interactions_of(rows[::-1]), "b")
    pd.testing.assert_frame_equal(a.items, b.items)
    np.testing.assert_array_equal(a.packed.items, b.packed.items)
    assert a.items["item_id"].tolist() == [1, 2, 3]


def test_empty_and_too_short_datasets_fail_clearly() -> None:
    with pytest.raises(EmptyDatasetError, match="empty"):
        PreparedDataset.from_interactions(interactions_of([]), "empty")
    with pytest.raises(EmptyDatasetError, match="no user has 2 or more interactions"):
        PreparedDataset.from_interactions(interactions_of([(1, 1, 1, 1.0), (2, 1, 1, 1.0), (2, 1, 1, 1.0)]), "short")


# --- the cache ----------------------------------------------------------------------------------
@pytest.fixture
def slice_copy(tmp_path: Path) -> Path:
    """A writable copy of the ml-latest-small slice, so tests can touch and edit it."""
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    for name in ("ratings.csv", "movies.csv"):
        shutil.copy(SLICE / name, folder / name)
    return folder


def test_cache_round_trip_and_no_work_on_rerun(
    slice_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "datasets"
    built = prepare(slice_copy, root)
    out = root / "ml-latest-small"
    assert not built.from_cache and {p.name for p in out.iterdir()} == {
        "offsets.npy", "items.npy", "timestamps.npy", "ratings.npy", "users.parquet", "items.parquet",
        "manifest.json",
    }  # fmt: skip
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_parsing(self: FileSource) -> Interactions:
        raise AssertionError("the cache was valid, nothing should be parsed")

    monkeypatch.setattr(FileSource, "load", no_parsing)
    caplog.set_level(logging.INFO)
    again = prepare(slice_copy, root)
    assert again.from_cache and "inputs unchanged, using the cache" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # What comes back is what was built.
    for field in ("offsets", "items", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(again.packed, field), getattr(built.packed, field))
    assert again.raw_users.tolist() == built.raw_users.tolist()
    pd.testing.assert_frame_equal(again.items, built.items)
    assert again.manifest == built.manifest

    # Touched but unchanged: the sha256 still matches, so still no parsing (and the new mtime is noted).
    os.utime(slice_copy / "ratings.csv", ns=(1, 1))
    assert prepare(slice_copy, root).from_cache
    assert Manifest.read(out / "manifest.json").fingerprint == FileSource(slice_copy).fingerprint()


def test_changed_input_or_format_version_rebuilds(slice_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    first = prepare(slice_copy, root)
    with open(slice_copy / "ratings.csv", "a") as f:
        f.write("9,31,4.0,1260759144\n9,1029,3.0,1260759145\n")
    second = prepare(slice_copy, root)
    assert not second.from_cache
    assert second.manifest.counts.interactions == first.manifest.counts.interactions + 2
    assert second.manifest.checksum != first.manifest.checksum

    manifest = root / "ml-latest-small" / "manifest.json"
    old_version = manifest.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 0')
    manifest.write_text(old_version)
    assert not prepare(slice_copy, root).from_cache


def test_manifest_records_provenance(slice_copy: Path, tmp_path: Path) -> None:
    ds = prepare(slice_copy, tmp_path / "datasets")
    m = Manifest.read(tmp_path / "datasets" / "ml-latest-small" / "manifest.json")
    assert m == ds.manifest
    assert m.source == f"movielens-csv:{slice_copy / 'ratings.csv'}"
    assert m.checksum == FileSource(slice_copy).checksum()
    assert m.raw_item_kind == "movieId" and m.format_version == FORMAT_VERSION
    assert m.counts == (699, 8, 503)


def test_synthetic_is_cached_by_config(tmp_path: Path) -> None:
    small = SyntheticConfig(num_users=40, num_items=30, seed=3)
    a = prepare("synthetic", tmp_path, synthetic=small)
    assert prepare("synthetic", tmp_path, synthetic=small).from_cache
    b = prepare("synthetic", tmp_path, synthetic=SyntheticConfig(num_users=40, num_items=30, seed=4))
    assert not a.from_cache and not b.from_cache
    assert a.num_users == 40


def test_sequences_frame_matches_packed_arrays() -> None:
    interactions = FileSource(SLICE).load()
    ds = PreparedDataset.from_interactions(interactions, "slice")
    frame = ds.sequences
    assert frame.columns.tolist() == ["user", "raw_user", "item_ids", "timestamps", "ratings"]
    # every rating travels with its event (the slice has no duplicate rows to drop)
    assert sum(float(r.sum()) for r in frame["ratings"]) == pytest.approx(interactions.frame["rating"].sum())
    assert frame["user"].tolist() == list(range(8)) and frame["raw_user"].tolist() == list(range(1, 9))
    for user in (0, 7):
        items, timestamps = ds.packed[user]
        np.testing.assert_array_equal(frame.loc[user, "item_ids"], items)
        assert (np.diff(frame.loc[user, "timestamps"]) >= 0).all()
    assert sum(len(s) for s in frame["item_ids"]) == 699


def test_cli_prints_one_summary_line(
    slice_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset", str(slice_copy), "--root", str(tmp_path / "datasets")]
    prepare_module.main(args)
    expected = (
        f"ml-latest-small: 699 interactions, 8 users, 503 items "
        f"(source: movielens-csv:{slice_copy / 'ratings.csv'})\n"
    )
    assert capsys.readouterr().out == expected
    prepare_module.main(args)  # from the cache: the same line
    assert capsys.readouterr().out == expected
    assert summary_line(prepare(slice_copy, tmp_path / "datasets")) == expected.strip()


def test_bad_input_loses_nothing(slice_copy: Path, tmp_path: Path) -> None:
    """A ratings file cut inside its last timestamp (issue #20, item 9) or with a negative time is an
    error naming the file and line, and the cache built from the good file stays as it was."""
    root = tmp_path / "datasets"
    prepare(slice_copy, root)
    out = root / "ml-latest-small"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    ratings = slice_copy / "ratings.csv"
    good = ratings.read_text()
    assert good.endswith("\n8,44004,3.0,1154473017\n")
    for bad, line in [(good[: -len("73017\n")], 700), (good.replace(",1260759144\n", ",-1260759144\n", 1), 2)]:
        ratings.write_text(bad)
        with pytest.raises(MalformedFileError, match=rf"ratings.csv line {line}: "):
            prepare(slice_copy, root)
        assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_missing_cache_file_rebuilds(slice_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    prepare(slice_copy, root)
    for name in ("items.parquet", "timestamps.npy"):
        (root / "ml-latest-small" / name).unlink()
        rebuilt = prepare(slice_copy, root)
        assert not rebuilt.from_cache and (root / "ml-latest-small" / name).is_file()


# --- the CLI on bad input -----------------------------------------------------------------------
HANG_RUNS = 10
HANG_TIMEOUT_S = 30  # a run takes about a second; one that has not exited by then is hung


def test_cli_exits_promptly_on_a_malformed_file(tmp_path: Path) -> None:
    """Issue #20, item 8: after reporting a malformed file, the CLI hung at exit in some runs (Arrow's
    readahead thread was still reading the file through Python when the interpreter shut down).
    Every run must end at once, with status 1 (not an abort either) and the file and line named."""
    path = tmp_path / "ratings.csv"
    # 5 fields per row, ~9 MB: several blocks for Arrow to read ahead after the first one fails.
    rows = (f"{i % 500 + 1},{i % 3000 + 10},4.0,{1_000_000_000 + i},x\n" for i in range(300_000))
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(rows))
    expected = f"{path} line 2: expected userId,movieId,rating,timestamp (4 fields), got 5 fields"
    command = [sys.executable, "-m", "data.prepare", "--dataset", str(path), "--root", str(tmp_path / "ds")]
    for run in range(1, HANG_RUNS + 1):
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run} of {HANG_RUNS} did not exit within {HANG_TIMEOUT_S} s")
        assert done.returncode == 1, f"run {run}: status {done.returncode}\n{done.stderr[-2000:]}"
        assert expected in done.stderr
    assert not (tmp_path / "ds").exists()  # nothing cached from a file that failed


# --- what training sees did not change --------------------------------------------------------
def digest(ds: PreparedDataset) -> str:
    """sha256 of what training, evaluation and the export read: the packed arrays (items as int64,
    ratings as float32), the raw user ids, the raw item ids and the titles."""
    h = hashlib.sha256()
    for values, dtype in ((ds.packed.offsets, np.int64), (ds.packed.items, np.int64),
                          (ds.packed.timestamps, np.int64), (ds.packed.ratings, np.float32)):
        h.update(np.asarray(values, dtype=dtype).tobytes())
    h.update(json.dumps([str(u) for u in ds.raw_users.tolist()]).encode())
    h.update(json.dumps([str(i) for i in ds.items["raw_item"].tolist()]).encode())
    h.update(json.dumps([None if pd.isna(t) else str(t) for t in ds.items["title"].tolist()]).encode())
    return h.hexdigest()


# Recorded with the pandas preparation this one replaced (commit df590fe, PreparedDataset.from_interactions).
BEFORE = {
    "ml-latest-small": "f14df04c87bb49d5d8cacec4f2a485287c5951dfe0e0f726c8bcf0e476861eea",
    "movielens-dat": "d9dc9bfbe3df4ded0333b32f1ad546a0e6c771a3dd11255ead11f89d9d0b9699",
    "amazon_ratings.csv": "a232fcc93597ceaa74d5ac824f29c1ce317cd22dea1c4ba191330cdf3e084c4c",
    "sample.inter": "8fc2369923e601e7aa4b5acd2aba7902709d33634035ee44af0cdb8bf0a5008d",
    "synthetic-301": "e02bdd2f62a0678a22a6c7f0ab9d8eea7d403d1a63308815f05debd4e41edebb",
    "synthetic-default": "cf38105db2b81d0f071924fe7274e67ecfbfac4f84d68b8d7b69592b452862fa",
    "ml-1m-wheel": "5bfde8a6d8e4137b34ed4c82e1bd342981759acd9fb2efdc9a9be41a7f79f494",
}
FILES = {"ml-latest-small": SLICE, "movielens-dat": FIXTURES / "formats" / "movielens-dat",
         "amazon_ratings.csv": FIXTURES / "formats" / "amazon_ratings.csv",
         "sample.inter": FIXTURES / "formats" / "sample.inter"}


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_fixtures_prepare_to_the_same_sequences_as_before(name: str, tmp_path: Path) -> None:
    """The ML-1M-shaped fixtures give byte for byte the sequences, ids and titles the pandas
    preparation gave: in memory, and streamed from the file in partitions of a few events."""
    assert digest(PreparedDataset.from_interactions(FileSource(FILES[name]).load(), name)) == BEFORE[name]
    streamed = prepare(DatasetSpec(str(FILES[name]), str(tmp_path)), partition_events=3)
    assert digest(streamed) == BEFORE[name]


@pytest.mark.parametrize(("name", "config"), [
    ("synthetic-301", SyntheticConfig(num_users=301, num_items=400, mean_length=15, seed=7)),
    ("synthetic-default", SyntheticConfig()),
])
def test_synthetic_prepares_to_the_same_sequences_as_before(name: str, config: SyntheticConfig,
                                                            tmp_path: Path) -> None:
    assert digest(prepare("synthetic", tmp_path, synthetic=config, partition_events=1000)) == BEFORE[name]


def test_the_ml1m_wheel_streams_to_the_same_sequences_as_before(tmp_path: Path) -> None:
    """The RecBole copy of ML-1M (what `make data` falls back to): users back to ints, items keyed
    and titled by their titles, as the pandas reader did."""
    wheel = tmp_path / movielens_1m.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(movielens_1m.WHEEL_MEMBER, (FIXTURES / "formats" / "sample.inter").read_bytes())
    stream = movielens_1m.recbole_wheel_events(wheel)
    out = tmp_path / "out"
    built = build(stream, out, work=tmp_path / "work")
    manifest = Manifest("ml-1m", stream.source, stream.raw_item_kind, "", None, built.raw_counts, built.counts,
                        built.dropped, has_ratings=True)
    assert digest(PreparedDataset.load(out, manifest)) == BEFORE["ml-1m-wheel"]


# --- the k-core filter --------------------------------------------------------------------------
def test_kcore_repeats_until_nothing_falls_short(tmp_path: Path) -> None:
    """At least 2 events per user and per item. One pass drops only u4 (1 event); that leaves i3 with
    one event, so i3 goes; that leaves u3 with one, so u3 goes: three rounds, and u3 and i3, which a
    single pass keeps, are gone."""
    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp\n"
                    "u1,i1,1\nu1,i2,2\n"
                    "u2,i1,3\nu2,i2,4\n"
                    "u3,i2,5\nu3,i3,6\n"
                    "u4,i3,7\n")
    ds = prepare(DatasetSpec(str(path), str(tmp_path / "ds"), kcore=KCore(2, 2)))
    assert as_lists(ds) == {"u1": ["i1", "i2"], "u2": ["i1", "i2"]}
    d = ds.manifest.dropped
    assert (d.kcore_rounds, d.short_users, d.short_items) == (3, 2, 1)
    assert (d.short_user_events, d.short_item_events) == (2, 1)  # u4-i3, u3-i2 by the user rule; u3-i3 by i3
    assert ds.manifest.options["min_item_events"] == 2
    one_pass = PreparedDataset.from_interactions(FileSource(path).load(), "x", kcore=KCore(2, 1))
    assert set(as_lists(one_pass)) == {"u1", "u2", "u3"}  # the user rule alone: only u4 goes


def reference(rows: list[tuple], kcore: KCore) -> dict[object, list[object]]:
    """The rules in plain Python: duplicates (first kept), the k-core to its fixed point, order by
    (time, file position)."""
    seen, kept = set(), []
    for position, row in enumerate(rows):
        if row not in seen:
            seen.add(row)
            kept.append((position, row))
    while True:
        users = collections.Counter(row[0] for _, row in kept)
        items = collections.Counter(row[1] for _, row in kept)
        left = [(p, r) for p, r in kept
                if users[r[0]] >= kcore.min_user_events and items[r[1]] >= kcore.min_item_events]
        if len(left) == len(kept):
            break
        kept = left
    out: dict[object, list[tuple]] = {}
    for position, row in kept:
        out.setdefault(row[0], []).append((row[2], position, row[1]))
    return {user: [item for _, _, item in sorted(events)] for user, events in out.items()}


@pytest.mark.parametrize("string_ids", [False, True])
def test_streamed_in_partitions_equals_the_rules_in_plain_python(string_ids: bool, tmp_path: Path) -> None:
    """Random events with many same-second ties and exact duplicates; ids as ints or strings; the
    k-core at (3, 4); partitions of any size give the same result, the rules' one."""
    rng = np.random.default_rng(3)
    n = 4000
    # ~4 events per user and ~6 per item: the k-core (3, 4) takes several rounds and keeps some.
    columns = [rng.integers(0, 1000, n), rng.integers(0, 700, n), rng.integers(0, 3, n), rng.integers(1, 3, n)]
    rows = list(zip(*(c.tolist() for c in columns), strict=True))
    if string_ids:
        rows = [(f"u{u}", f"i{i}", t, r) for u, i, t, r in rows]
    rows = [(u, i, t, float(r)) for u, i, t, r in rows]
    kcore = KCore(3, 4)
    expected = reference(rows, kcore)
    results = []
    for partition_events in (10**9, 500, 37):
        with tempfile.TemporaryDirectory() as tmp:
            built = build(interactions_of(rows).stream(batch_rows=333), Path(tmp) / "out", work=Path(tmp) / "w",
                          kcore=kcore, partition_events=partition_events)
            manifest = Manifest("x", "x", "item", "", None, built.raw_counts, built.counts, built.dropped)
            ds = PreparedDataset.load(Path(tmp) / "out", manifest, mmap=False)
            results.append((as_lists(ds), built.dropped))
    assert results[0][0] == expected and len(expected) > 50
    assert results[0][1].duplicate_rows > 0 and results[0][1].kcore_rounds > 1
    assert all(r == results[0] for r in results)


def test_event_types_filter_and_tell_duplicates_apart(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp,kind\n"
                    "a,x,1,view\na,x,1,view\na,x,1,buy\n"  # a view repeated, and a buy at the same second
                    "a,y,2,share\nb,x,3,view\nb,y,4,buy\n")
    read = ReadOptions(columns=Columns(event_type="kind"))
    both = prepare(DatasetSpec(str(path), str(tmp_path / "ds"), read=read))
    assert as_lists(both) == {"a": ["x", "x", "y"], "b": ["x", "y"]}
    assert both.manifest.dropped.duplicate_rows == 1  # only the repeated view
    kept = prepare(DatasetSpec(str(path), str(tmp_path / "ds"), read=read, event_types=("view", "buy")))
    assert as_lists(kept) == {"a": ["x", "x"], "b": ["x", "y"]}
    assert kept.manifest.dropped.other_event_types == 1
    with pytest.raises(ValueError, match="no event-type column"):
        prepare(DatasetSpec(str(path), str(tmp_path / "ds2"), event_types=("view",)))


def test_implicit_feedback_has_no_ratings_file(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("user,item,timestamp\na,x,1\na,y,2\nb,x,3\nb,y,4\n")
    ds = prepare(DatasetSpec(str(path), str(tmp_path / "ds")))
    assert not ds.manifest.has_ratings and not (tmp_path / "ds" / "clicks" / "ratings.npy").exists()
    assert ds.packed.ratings.shape == (4,) and np.isnan(ds.packed.ratings).all()
    assert ds.packed.ratings.strides == (0,)  # one NaN, broadcast: no memory per event


# --- bounded memory -----------------------------------------------------------------------------
_PEAK = """
import atexit, runpy, sys
atexit.register(lambda: print([l for l in open("/proc/self/status") if l.startswith("VmPeak")][0], file=sys.stderr))
{body}
"""


def run_capped(body: str, cap_bytes: int | None) -> tuple[int, str, int]:
    """(exit status, stderr, peak virtual memory in bytes) of a Python snippet in a subprocess whose
    address space is capped at ``cap_bytes`` (RLIMIT_AS). The system allocator and two malloc arenas,
    so that the address space holds what is used, not what allocators reserve ahead."""
    def limit() -> None:
        if cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK.format(body=body)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    peak = [line for line in done.stderr.splitlines() if line.startswith("VmPeak")]
    return done.returncode, done.stderr, int(peak[-1].split()[1]) * 1024 if peak else 0


def test_preparation_streams_a_file_whose_pandas_load_exceeds_the_memory_cap(tmp_path: Path) -> None:
    """5M events with string ids (~150 MB of csv). Loading it into pandas, as preparation did, takes
    some peak P of address space; under a cap of 0.6 P that load fails, and the streaming preparation
    (small blocks and partitions: its memory does not grow with the file) succeeds."""
    path = tmp_path / "events.csv"
    config = EventFileConfig(SyntheticConfig(num_users=100_000, num_items=20_000, mean_length=50), string_ids=True)
    events = write_event_file(path, config)
    load = f"from data.formats import read_ratings; print(len(read_ratings({str(path)!r}, 'csv')))"
    status, err, pandas_peak = run_capped(load, None)
    assert status == 0, err[-2000:]
    cap = int(0.6 * pandas_peak)
    status, err, _ = run_capped(load, cap)
    assert status != 0, f"the pandas load fit in {cap >> 20} MiB"
    prepare_it = ("import sys; sys.argv = ['data.prepare', '--dataset', {path!r}, '--root', {root!r}, "
                  "'--block-mb', '1', '--partition-events', '500000']; runpy.run_module('data.prepare', "
                  "run_name='__main__')").format(path=str(path), root=str(tmp_path / "ds"))
    status, err, peak = run_capped(prepare_it, cap)
    assert status == 0, f"under {cap >> 20} MiB (pandas: {pandas_peak >> 20} MiB):\n{err[-3000:]}"
    assert peak < cap
    manifest = Manifest.read(tmp_path / "ds" / "events" / "manifest.json")
    assert manifest.raw_counts.interactions == events and manifest.counts.users == 100_000
