"""Preprocessing (drops, stable sort, dense ids), the prepared files and the CLI."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import prepare as prepare_module
from data.formats import FileSource, MalformedFileError
from data.interactions import Interactions
from data.manifest import FORMAT_VERSION, Manifest
from data.prepare import PreparedDataset, prepare, summary_line
from data.streaming import EmptyDatasetError
from data.synthetic import SyntheticConfig

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
