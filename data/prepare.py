"""Prepares a dataset for training: raw file -> per-user sequences, cached as Parquet.

``prepare`` writes ``<root>/<name>/``:

    sequences.parquet   user (dense 0..U-1), raw_user, item_ids list<int64>, timestamps list<int64>
    items.parquet       item_id (dense 1..I; 0 is padding), raw_item, title (missing when unknown)
    manifest.json       source, input checksum, counts, dropped counts, format version

and a rerun with unchanged inputs reads those back without parsing anything (it logs so).

Example::

    >>> ds = prepare("ml-1m")                                  # doctest: +SKIP
    >>> ds.num_users, ds.num_items, ds.sequences.columns.tolist()          # doctest: +SKIP
    (6040, 3706, ['user', 'raw_user', 'item_ids', 'timestamps'])

CLI (``make data`` runs the first)::

    python -m data.prepare --dataset ml-1m
    python -m data.prepare --dataset ../shared/data/ml-latest-small
    python -m data.prepare --dataset ratings_Books.csv --format amazon-csv --name amazon-books
    python -m data.prepare --dataset synthetic --num-users 100000 --num-items 50000
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.formats import FileSource, Format
from data.interactions import Counts, DatasetSource, Interactions
from data.manifest import Manifest
from data.movielens_1m import MovieLens1M
from data.sequences import UserSequences, index_interactions
from data.synthetic import SyntheticConfig, SyntheticSource

log = logging.getLogger(__name__)

SEQUENCES_FILE = "sequences.parquet"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"


@dataclass
class PreparedDataset:
    """A dataset in the training format.

    Attributes:
        packed: every user's dense item ids and timestamps, oldest first, in flat arrays (the
            DataLoader gathers batches from these); index = dense user.
        raw_users: [num_users] the raw id of each dense user index.
        items: (item_id, raw_item, title), one row per dense item id 1..num_items, in order.
        manifest: provenance and counts.
        from_cache: True when ``prepare`` read this back instead of building it.
    """

    packed: UserSequences
    raw_users: pd.Series
    items: pd.DataFrame
    manifest: Manifest
    from_cache: bool = False

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def num_users(self) -> int:
        return len(self.packed)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @cached_property
    def sequences(self) -> pd.DataFrame:
        """One row per user: user (dense), raw_user, item_ids, timestamps (int64 arrays) and ratings
        (float32), oldest first; views into ``packed``, so this costs no copy of the events."""
        cuts = self.packed.offsets[1:-1]
        return pd.DataFrame(
            {
                "user": np.arange(self.num_users, dtype=np.int64),
                "raw_user": self.raw_users.to_numpy(),
                "item_ids": np.split(self.packed.items, cuts),
                "timestamps": np.split(self.packed.timestamps, cuts),
                "ratings": np.split(self.packed.ratings, cuts),
            }
        )

    @classmethod
    def from_interactions(
        cls, interactions: Interactions, name: str, fingerprint: str | None = None
    ) -> PreparedDataset:
        """Builds in memory (no files); ``prepare`` adds the cache around this."""
        packed, raw_users, items, dropped = index_interactions(interactions)
        manifest = Manifest(
            name=name,
            source=interactions.source,
            raw_item_kind=interactions.raw_item_kind,
            checksum=interactions.checksum,
            fingerprint=fingerprint,
            raw_counts=interactions.counts(),
            counts=Counts(packed.num_events, len(packed), len(items)),
            dropped=dropped,
        )
        return cls(packed, raw_users, items, manifest)

    # --- the cache ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Writes the three files; the manifest goes last, so a crash never leaves a valid-looking cache."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        offsets = pa.array(self.packed.offsets)
        sequences = pa.table(
            {
                "user": np.arange(self.num_users, dtype=np.int64),
                "raw_user": pa.array(self.raw_users),
                "item_ids": pa.LargeListArray.from_arrays(offsets, pa.array(self.packed.items)),
                "timestamps": pa.LargeListArray.from_arrays(offsets, pa.array(self.packed.timestamps)),
                "ratings": pa.LargeListArray.from_arrays(offsets, pa.array(self.packed.ratings)),
            }
        )
        _write_atomically(directory / SEQUENCES_FILE, lambda p: pq.write_table(sequences, p))
        items = pa.Table.from_pandas(self.items, preserve_index=False)
        _write_atomically(directory / ITEMS_FILE, lambda p: pq.write_table(items, p))
        _write_atomically(directory / MANIFEST_FILE, lambda p: Path(p).write_text(self.manifest.to_json()))

    @classmethod
    def load(cls, directory: Path, manifest: Manifest | None = None) -> PreparedDataset:
        manifest = manifest or Manifest.read(directory / MANIFEST_FILE)
        if manifest is None:
            raise FileNotFoundError(f"{directory} holds no prepared dataset of the current format version")
        table = pq.read_table(directory / SEQUENCES_FILE)
        items_column = table.column("item_ids").combine_chunks()
        offsets = items_column.offsets.to_numpy()
        packed = UserSequences(
            offsets=offsets - offsets[0],
            items=items_column.flatten().to_numpy(),
            timestamps=table.column("timestamps").combine_chunks().flatten().to_numpy(),
            ratings=table.column("ratings").combine_chunks().flatten().to_numpy(),
        )
        users = table.select(["user", "raw_user"]).to_pandas()
        items = pq.read_table(directory / ITEMS_FILE).to_pandas()
        if not np.array_equal(users["user"].to_numpy(), np.arange(len(users))) or not np.array_equal(
            items["item_id"].to_numpy(), np.arange(1, len(items) + 1)
        ):
            raise ValueError(f"{directory}: users or items are not dense 0..U-1 / 1..I; delete it to rebuild")
        return cls(packed, users["raw_user"], items, manifest, from_cache=True)


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# --- prepare ------------------------------------------------------------------------------------
def resolve_source(
    dataset: str | Path,
    root: Path | str = "datasets",
    *,
    fmt: Format | str | None = None,
    name: str | None = None,
    synthetic: SyntheticConfig | None = None,
) -> DatasetSource:
    """"ml-1m" (downloaded), "synthetic" (generated), or the path of a rating file or its folder."""
    if str(dataset) == MovieLens1M.name:
        source: DatasetSource = MovieLens1M(root)
    elif str(dataset) == "synthetic":
        source = SyntheticSource(synthetic or SyntheticConfig())
    else:
        source = FileSource(Path(dataset), fmt)
    if name is not None:
        source.name = name
    return source


def prepare(
    dataset: str | Path | DatasetSource = "ml-1m",
    root: Path | str = "datasets",
    *,
    fmt: Format | str | None = None,
    name: str | None = None,
    synthetic: SyntheticConfig | None = None,
    force: bool = False,
) -> PreparedDataset:
    """Returns the prepared dataset, building ``<root>/<name>/`` only when its inputs changed.

    The cache is valid when the manifest (current format version) matches the input's fingerprint
    (sizes and mtimes: no reading at all), or else its sha256 (files read, nothing parsed).
    """
    source = dataset if isinstance(dataset, DatasetSource) else resolve_source(
        dataset, root, fmt=fmt, name=name, synthetic=synthetic
    )
    directory = Path(root) / source.name
    complete = all((directory / f).is_file() for f in (SEQUENCES_FILE, ITEMS_FILE))
    cached = Manifest.read(directory / MANIFEST_FILE) if complete and not force else None
    fingerprint = source.fingerprint()
    if cached is not None and fingerprint is not None and cached.fingerprint == fingerprint:
        log.info("%s: inputs unchanged, using the cache in %s", source.name, directory)
        return PreparedDataset.load(directory, cached)
    if cached is not None and cached.checksum == source.checksum():
        log.info("%s: inputs unchanged (same sha256), using the cache in %s", source.name, directory)
        cached = replace(cached, fingerprint=source.fingerprint())
        # Next time the fingerprint alone will do.
        _write_atomically(directory / MANIFEST_FILE, lambda p: Path(p).write_text(cached.to_json()))
        return PreparedDataset.load(directory, cached)

    log.info("%s: no valid cache in %s, preparing", source.name, directory)
    interactions = source.load()
    prepared = PreparedDataset.from_interactions(interactions, source.name, source.fingerprint())
    prepared.save(directory)
    log.info("%s: wrote %s", source.name, directory)
    return prepared


def summary_line(dataset: PreparedDataset) -> str:
    m = dataset.manifest
    return (
        f"{m.name}: {m.counts.interactions} interactions, {m.counts.users} users, "
        f"{m.counts.items} items (source: {m.source})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", default="ml-1m", help='"ml-1m", "synthetic", or a rating file or its folder'
    )
    parser.add_argument(
        "--format", choices=[f.value for f in Format], help="of the rating file (default: detected)"
    )
    parser.add_argument("--root", default="datasets", help="where prepared datasets live (default: datasets)")
    parser.add_argument("--name", help="folder name under --root (default: from the dataset)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    synthetic = parser.add_argument_group("synthetic (data.synthetic.SyntheticConfig)")
    for f in fields(SyntheticConfig):  # one flag per field, so the CLI can build what a config can
        synthetic.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    dataset = prepare(
        args.dataset, args.root, fmt=args.format, name=args.name, synthetic=config, force=args.force
    )
    print(summary_line(dataset))


if __name__ == "__main__":
    main()
