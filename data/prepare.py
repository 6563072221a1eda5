"""Prepares a dataset for training, as a step of its own: raw events -> packed, memory-mappable arrays.

``prepare`` streams the input (``data.streaming``: bounded memory whatever its size) and writes
``<root>/<name>/``:

    offsets.npy       [U+1] int64: user u's events are rows offsets[u]:offsets[u+1] of the arrays below
    items.npy         [N] int32 dense item ids (1..I; 0 is padding), by user, then time (ties in file order)
    timestamps.npy    [N] int64 seconds
    ratings.npy       [N] float32 (only for explicit feedback)
    users.parquet     raw_user: the raw id of each dense user 0..U-1, in order
    items.parquet     item_id (dense 1..I), raw_item, title (missing when unknown)
    manifest.json     source, input checksum, how it was read (format, columns, k-core), counts,
                      what was dropped, format version: written last

Training, evaluation and the export open it with ``open_prepared`` (memory-mapped: every rank of a
machine shares the page cache, none copies the events) and never prepare anything themselves: a
dataset that is missing, prepared with other options or from an input that changed since is an error
that names the command to run. A rerun of ``prepare`` with unchanged inputs and options reads
nothing (it logs so).

Example::

    >>> ds = prepare("ml-1m")                                  # doctest: +SKIP
    >>> ds.num_users, ds.num_items, ds.packed.num_events       # doctest: +SKIP
    (6040, 3706, 1000209)

CLI (``make data`` / ``make train`` run the first)::

    python -m data.prepare --config configs/ml-1m/hstu.yaml           # the dataset a training config names
    python -m data.prepare --dataset ml-1m
    python -m data.prepare --dataset ../shared/data/ml-latest-small
    python -m data.prepare --dataset ratings_Books.csv --format amazon-csv --name amazon-books
    python -m data.prepare --dataset events.parquet --user-column uid --item-column sku \\
        --timestamp-column ts --kcore-users 5 --kcore-items 5
    python -m data.prepare --dataset synthetic --num-users 100000 --num-items 50000
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data import formats
from data.formats import Columns, FileSource, Format, IdType, ReadOptions
from data.interactions import DatasetSource, EventStream, Interactions
from data.manifest import FORMAT_VERSION, Manifest
from data.movielens_1m import MovieLens1M
from data.sequences import MIN_EVENTS, UserSequences
from data.streaming import (
    ITEMS_FILE,
    ITEMS_TABLE,
    OFFSETS_FILE,
    PARTITION_EVENTS,
    RATINGS_FILE,
    TIMESTAMPS_FILE,
    USERS_TABLE,
    KCore,
    build,
)
from data.synthetic import SyntheticConfig, SyntheticSource

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
DATA_FILES = (OFFSETS_FILE, ITEMS_FILE, TIMESTAMPS_FILE, RATINGS_FILE, USERS_TABLE, ITEMS_TABLE)
OLD_FILES = ("sequences.parquet",)
"""Files of earlier format versions, removed when a dataset is prepared again."""


class NotPrepared(RuntimeError):
    """The dataset a config names is not prepared (or not as the config asks): run ``data.prepare``."""


@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset, read how: what ``python -m data.prepare`` prepares and training opens.

    Attributes:
        dataset: "ml-1m" (downloaded), "synthetic" (generated), or the path of an event file (or of a
            folder holding ratings.csv/ratings.dat).
        root: where prepared datasets live.
        name: folder under ``root``; "" names it after the dataset.
        format: a ``data.formats.Format`` value; "" tells it from the file.
        read: how to read a file (column mapping, implicit feedback, csv details).
        event_types: keep only events of these types (needs ``read.columns.event_type``); () keeps all.
        kcore: the k-core filter (``data.sequences``).
        synthetic: the generator's config when ``dataset`` is "synthetic".
    """

    dataset: str = "ml-1m"
    root: str = "datasets"
    name: str = ""
    format: str = ""
    read: ReadOptions = field(default_factory=ReadOptions)
    event_types: tuple[str, ...] = ()
    kcore: KCore = field(default_factory=KCore)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def source(self) -> DatasetSource:
        """The source, named; reads at most the file's first line (to tell its format)."""
        if self.dataset == MovieLens1M.name:
            source: DatasetSource = MovieLens1M(self.root)
        elif self.dataset == "synthetic":
            source = SyntheticSource(self.synthetic)
        else:
            source = FileSource(Path(self.dataset), self.format or None, options=self.read)
        if self.format and not isinstance(source, FileSource):
            raise ValueError(f"format {self.format!r} applies to files only, not to {self.dataset!r}")
        if self.name:
            source.name = self.name
        return source

    def options(self, source: DatasetSource) -> dict[str, object]:
        """What the manifest records of how the data was read and filtered."""
        return {
            "read": source.read_options(),
            "implicit": self.read.implicit,
            "event_types": sorted(self.event_types),
            "min_user_events": self.kcore.min_user_events,
            "min_item_events": self.kcore.min_item_events,
        }


class PreparedDataset:
    """A dataset in the training format, usually memory-mapped from ``<root>/<name>/``.

    Attributes:
        packed: every user's dense item ids, timestamps and ratings, oldest first, in flat arrays (the
            DataLoader gathers batches from these); index = dense user.
        manifest: provenance and counts.
        from_cache: True when ``prepare`` read this back instead of building it.
    The raw ids (``raw_users``, ``items``) are read on first use.
    """

    def __init__(self, packed: UserSequences, manifest: Manifest, *, directory: Path | None = None,
                 raw_users: pd.Series | None = None, items: pd.DataFrame | None = None,
                 from_cache: bool = False) -> None:
        self.packed, self.manifest, self.directory, self.from_cache = packed, manifest, directory, from_cache
        self._raw_users, self._items = raw_users, items
        if raw_users is None and items is None and directory is None:
            raise ValueError("a PreparedDataset needs its directory or its raw ids")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def num_users(self) -> int:
        return len(self.packed)

    @property
    def num_items(self) -> int:
        return self.manifest.counts.items

    @property
    def raw_users(self) -> pd.Series:
        """[num_users] the raw id of each dense user index."""
        if self._raw_users is None:
            assert self.directory is not None
            self._raw_users = _read_raw_users(self.directory)
        return self._raw_users

    @property
    def items(self) -> pd.DataFrame:
        """(item_id, raw_item, title), one row per dense item id 1..num_items, in order."""
        if self._items is None:
            assert self.directory is not None
            self._items = pq.read_table(self.directory / ITEMS_TABLE).to_pandas()
        return self._items

    @cached_property
    def sequences(self) -> pd.DataFrame:
        """One row per user: user (dense), raw_user, item_ids, timestamps and ratings (arrays), oldest
        first. Materialises one array per user: for small datasets (tests, notebooks); code that
        must scale reads ``packed``."""
        cuts = self.packed.offsets[1:-1]
        return pd.DataFrame(
            {
                "user": np.arange(self.num_users, dtype=np.int64),
                "raw_user": self.raw_users.to_numpy(),
                "item_ids": np.split(np.asarray(self.packed.items, dtype=np.int64), cuts),
                "timestamps": np.split(np.asarray(self.packed.timestamps), cuts),
                "ratings": np.split(np.asarray(self.packed.ratings), cuts),
            }
        )

    @classmethod
    def from_interactions(
        cls, interactions: Interactions, name: str, fingerprint: str | None = None, *,
        kcore: KCore | None = None, event_types: tuple[str, ...] = (),
    ) -> PreparedDataset:
        """Builds in memory (through the same streaming preparation, in a scratch folder)."""
        kcore = kcore or KCore()
        with tempfile.TemporaryDirectory(prefix="genrec-prepare-") as tmp:
            out = Path(tmp) / "out"
            stream = interactions.stream()
            built = build(stream, out, work=Path(tmp) / "work", kcore=kcore, event_types=event_types)
            options = {"min_user_events": kcore.min_user_events, "min_item_events": kcore.min_item_events,
                       "event_types": sorted(event_types)}
            manifest = built.manifest(name, stream, interactions.checksum, fingerprint, options)
            loaded = cls.load(out, manifest, mmap=False)
            return cls(loaded.packed, manifest, raw_users=loaded.raw_users, items=loaded.items)

    @classmethod
    def load(cls, directory: Path, manifest: Manifest | None = None, *, mmap: bool = True,
             from_cache: bool = True) -> PreparedDataset:
        """Opens a prepared dataset: the event arrays memory-mapped (``mmap``), or read whole."""
        directory = Path(directory)
        manifest = manifest or Manifest.read(directory / MANIFEST_FILE)
        if manifest is None:
            raise FileNotFoundError(f"{directory} holds no prepared dataset of format version {FORMAT_VERSION}")
        mode = "r" if mmap else None
        offsets = np.load(directory / OFFSETS_FILE)
        n = int(offsets[-1])
        items = np.load(directory / ITEMS_FILE, mmap_mode=mode)
        timestamps = np.load(directory / TIMESTAMPS_FILE, mmap_mode=mode)
        if manifest.has_ratings:
            ratings = np.load(directory / RATINGS_FILE, mmap_mode=mode)
        else:  # implicit feedback: unknown everywhere, at no cost per event
            ratings = np.broadcast_to(np.array(np.nan, dtype=np.float32), (n,))
        packed = UserSequences(offsets=offsets, items=items, timestamps=timestamps, ratings=ratings)
        c = manifest.counts
        if (n, len(packed)) != (c.interactions, c.users):
            raise ValueError(f"{directory}: the arrays hold {n} events of {len(packed)} users, the manifest "
                             f"{c.interactions} of {c.users}; prepare it again (--force)")
        return cls(packed, manifest, directory=directory, from_cache=from_cache)


def _read_raw_users(directory: Path) -> pd.Series:
    column = pq.read_table(directory / USERS_TABLE).column("raw_user")
    return pd.Series(column.to_pandas(), name="raw_user")


# --- prepare ------------------------------------------------------------------------------------
def prepare(
    dataset: str | Path | DatasetSource | DatasetSpec = "ml-1m",
    root: Path | str = "datasets",
    *,
    fmt: Format | str | None = None,
    name: str | None = None,
    synthetic: SyntheticConfig | None = None,
    force: bool = False,
    partition_events: int = PARTITION_EVENTS,
) -> PreparedDataset:
    """Returns the prepared dataset, building ``<root>/<name>/`` only when its inputs or options changed.

    ``dataset`` is a ``DatasetSpec`` (all options), a source, or what ``DatasetSpec.dataset`` names
    (then ``root``, ``fmt``, ``name`` and ``synthetic`` complete it). The cache is valid when the
    manifest (current format version) records the same options and the input's fingerprint (sizes and
    mtimes: no reading at all), or else its sha256 (files read, nothing parsed). A failed preparation
    leaves an existing dataset as it was.
    """
    if isinstance(dataset, DatasetSpec):
        spec, source = dataset, dataset.source()
    elif isinstance(dataset, DatasetSource):
        spec, source = DatasetSpec(root=str(root)), dataset
    else:
        spec = DatasetSpec(str(dataset), str(root), name or "", str(fmt or ""),
                           synthetic=synthetic or SyntheticConfig())
        source = spec.source()
    root = Path(spec.root)
    directory = root / source.name
    options = spec.options(source)
    cached = None if force else Manifest.read(directory / MANIFEST_FILE)
    if cached is not None and cached.options == options and _files_present(directory, cached):
        fingerprint = source.fingerprint()
        if fingerprint is not None and cached.fingerprint == fingerprint:
            log.info("%s: inputs unchanged, using the cache in %s", source.name, directory)
            return PreparedDataset.load(directory, cached)
        if cached.checksum == source.checksum():
            log.info("%s: inputs unchanged (same sha256), using the cache in %s", source.name, directory)
            cached = replace(cached, fingerprint=source.fingerprint())
            # Next time the fingerprint alone will do.
            _write_atomically(directory / MANIFEST_FILE, lambda p: Path(p).write_text(cached.to_json()))
            return PreparedDataset.load(directory, cached)
    elif cached is not None and cached.options != options:
        log.info("%s: the dataset in %s was prepared with other options; preparing again", source.name, directory)

    log.info("%s: no valid cache in %s, preparing", source.name, directory)
    checksum = source.checksum()  # may download; hashes the input
    fingerprint = source.fingerprint()
    stream = source.events()
    if spec.read.implicit:
        stream = _without_ratings(stream)
    made_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{source.name}.new-", dir=root))
    ok = False
    try:
        built = build(stream, stage, work=stage / "work", kcore=spec.kcore, event_types=spec.event_types,
                      partition_events=partition_events)
        if source.fingerprint() != fingerprint:
            raise RuntimeError(f"{source.name}: the input changed while it was being prepared; prepare it again")
        manifest = built.manifest(source.name, stream, checksum, fingerprint, options)
        _install(stage, directory, manifest)
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok and made_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty: nothing is left of a failed first preparation
    log.info("%s: wrote %s", source.name, directory)
    return PreparedDataset.load(directory, manifest, from_cache=False)


def _files_present(directory: Path, manifest: Manifest) -> bool:
    needed = [f for f in DATA_FILES if f != RATINGS_FILE or manifest.has_ratings]
    return all((directory / f).is_file() for f in needed)


def _without_ratings(stream: EventStream) -> EventStream:
    def batches() -> Iterator[pa.RecordBatch]:
        for batch in stream.open():
            if "rating" in batch.schema.names:
                batch = batch.drop_columns(["rating"])
            yield batch

    return replace(stream, open=batches)


def _install(stage: Path, directory: Path, manifest: Manifest) -> None:
    """Moves the built files into ``directory``: the old manifest goes first and the new one comes
    last, so a crash in between leaves a folder that ``prepare`` rebuilds rather than a mix."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for name in (*DATA_FILES, *OLD_FILES):
        if (stage / name).is_file():
            os.replace(stage / name, directory / name)
        else:
            (directory / name).unlink(missing_ok=True)
    _write_atomically(directory / MANIFEST_FILE, lambda p: Path(p).write_text(manifest.to_json()))


def _write_atomically(path: Path, write) -> None:  # noqa: ANN001
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def open_prepared(spec: DatasetSpec) -> PreparedDataset:
    """The prepared dataset ``spec`` names, memory-mapped; what training and evaluation use.

    Raises:
        NotPrepared: when it is missing, was prepared with other options or its input changed since
            (the message says which); ``python -m data.prepare`` then prepares it.
    """
    try:
        source = spec.source()
    except (FileNotFoundError, ValueError) as error:
        raise NotPrepared(f"cannot open the dataset {spec.dataset!r}: {error}") from None
    directory = Path(spec.root) / source.name
    manifest = Manifest.read(directory / MANIFEST_FILE)
    if manifest is None or not _files_present(directory, manifest):
        raise NotPrepared(f"{spec.dataset!r} is not prepared: {directory} holds no prepared dataset of format "
                          f"version {FORMAT_VERSION}")
    options = spec.options(source)
    if manifest.options != options:
        differ = sorted(k for k in options if manifest.options.get(k) != options[k])
        there = {k: manifest.options.get(k) for k in differ}
        asked = {k: options[k] for k in differ}
        raise NotPrepared(f"{directory} was prepared with other options ({there} there, {asked} asked for)")
    fingerprint = source.fingerprint()
    if fingerprint is None or fingerprint != manifest.fingerprint:
        raise NotPrepared(f"the input of {directory} changed since it was prepared ({manifest.source})")
    return PreparedDataset.load(directory, manifest)


def summary_line(dataset: PreparedDataset) -> str:
    m = dataset.manifest
    return (
        f"{m.name}: {m.counts.interactions} interactions, {m.counts.users} users, "
        f"{m.counts.items} items (source: {m.source})"
    )


# --- the CLI ------------------------------------------------------------------------------------
def spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    if args.config:
        # Only here does data/ read a training config: it names the dataset the run will open.
        from training.config import load_config

        spec = load_config(args.config, args.overrides).data.spec()
        return replace(spec, root=args.root) if args.root else spec
    if args.overrides:
        raise SystemExit(f"key=value overrides ({args.overrides[0]}) need --config")
    columns = Columns(
        user=args.user_column, item=args.item_column, timestamp=args.timestamp_column,
        rating=args.rating_column, event_type=args.event_type_column,
    )
    names = tuple(args.column_names.split(",")) if args.column_names else ()
    read = ReadOptions(columns=columns, implicit=args.implicit, id_type=IdType(args.id_type),
                       delimiter=args.delimiter, column_names=names)
    return DatasetSpec(
        dataset=args.dataset,
        root=args.root or "datasets",
        name=args.name or "",
        format=args.format or "",
        read=read,
        event_types=tuple(args.event_types.split(",")) if args.event_types else (),
        kcore=KCore(args.kcore_users, args.kcore_items),
        synthetic=SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)}),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the files written.")
    parser.add_argument("--config", help="a training config: prepare the dataset its data section names "
                                         "(what `make data` and `make train` run)")
    parser.add_argument("overrides", nargs="*", help="with --config: section.key=value, e.g. data.min_user_events=5")
    parser.add_argument(
        "--dataset", default="ml-1m", help='"ml-1m", "synthetic", or an event file (or a folder with ratings.csv)'
    )
    parser.add_argument(
        "--format", choices=[f.value for f in Format], help="of the event file (default: detected)"
    )
    parser.add_argument("--root", help="where prepared datasets live (default: datasets, or the config's)")
    parser.add_argument("--name", help="folder name under --root (default: from the dataset)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    parser.add_argument("--partition-events", type=int, default=PARTITION_EVENTS,
                        help=f"events sorted at once: bounds the memory (default {PARTITION_EVENTS:,})")
    parser.add_argument("--block-mb", type=int, default=formats.BLOCK_BYTES >> 20,
                        help="MB of csv text parsed at once (default %(default)s)")
    read = parser.add_argument_group("csv and parquet files (data.formats.Columns, ReadOptions)")
    for role, default in (("user", "user"), ("item", "item"), ("timestamp", "timestamp"), ("rating", ""),
                          ("event-type", "")):
        read.add_argument(f"--{role}-column", default=default, help=f"(default: {default!r})")
    read.add_argument("--implicit", action="store_true", help="ignore ratings: implicit feedback")
    read.add_argument("--id-type", choices=[t.value for t in IdType], default=IdType.STRING.value,
                      help="csv: read ids as strings (default) or integers")
    read.add_argument("--delimiter", default=",", help="csv: the field delimiter")
    read.add_argument("--column-names", help="csv without a header line: its column names, comma-separated")
    read.add_argument("--event-types", help="keep only these event types (comma-separated)")
    filters = parser.add_argument_group("the k-core filter (data.sequences)")
    filters.add_argument("--kcore-users", type=int, default=MIN_EVENTS, metavar="N",
                         help=f"drop users with fewer events (a config's data.min_user_events; default {MIN_EVENTS})")
    filters.add_argument("--kcore-items", type=int, default=1, metavar="N",
                         help="drop items with fewer events (data.min_item_events; default 1)")
    synthetic = parser.add_argument_group("synthetic (data.synthetic.SyntheticConfig)")
    for f in fields(SyntheticConfig):  # one flag per field, so the CLI can build what a config can
        synthetic.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    formats.BLOCK_BYTES = args.block_mb << 20
    dataset = prepare(spec, force=args.force, partition_events=args.partition_events)
    print(summary_line(dataset))


if __name__ == "__main__":
    # Through the imported module, not this __main__ copy: a training config builds its DatasetSpec
    # from data.prepare, and isinstance() must know it.
    from data import prepare as _module

    _module.main()
