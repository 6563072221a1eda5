"""A training config names its dataset and how to read it; `python -m data.prepare --config` prepares
it as a step of its own, and training opens it (and refuses to start when it is not prepared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.formats import Columns
from data.prepare import NotPrepared, main, open_prepared
from data.splits import Split, SplitKind, split_targets
from data.synthetic import EventFileConfig, SyntheticConfig, write_event_file
from serving.artifact import load_artifact
from tests.launch import ROOT, torchrun
from training.config import load_config

EXAMPLE = ROOT / "configs" / "examples" / "own-parquet.yaml"
# What the example config's comment tells a user to run (its file, here under the test's folder).
EXAMPLE_FILE = EventFileConfig(SyntheticConfig(num_users=2000, num_items=1000), fmt="parquet",
                               columns=("user_id", "item_id", "event_time", "rating"), implicit=True,
                               string_ids=True, timestamp_type="timestamp")


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example config, reading its example file from ``tmp_path`` and preparing into it."""
    events = tmp_path / "raw" / "own-events.parquet"
    write_event_file(events, EXAMPLE_FILE)
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["data"] |= {"dataset": str(events), "root": str(tmp_path / "datasets")}
    raw["run"] = {"out_dir": str(tmp_path / "runs"), "tensorboard": False}
    path = tmp_path / "own-parquet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_example_config_reads_as_typed_fields() -> None:
    data = load_config(EXAMPLE).data
    assert data.format == "parquet"
    assert data.columns == Columns(user="user_id", item="item_id", timestamp="event_time")
    assert (data.min_user_events, data.min_item_events) == (5, 5)
    assert data.split.kind is SplitKind.TEMPORAL and data.split.valid_start < data.split.test_start
    spec = data.spec()
    assert spec.kcore.min_item_events == 5 and spec.read.columns.user == "user_id"
    with pytest.raises(ValueError, match="valid_start < test_start"):
        load_config(EXAMPLE, ["data.split.test_start=0"])


def test_prepare_by_config_then_open_and_what_refuses(example: Path) -> None:
    cfg = load_config(example)
    with pytest.raises(NotPrepared, match="is not prepared"):
        open_prepared(cfg.data.spec())
    main(["--config", str(example)])
    ds = open_prepared(cfg.data.spec())
    assert ds.directory == Path(cfg.data.root) / "own-events"
    assert not ds.manifest.has_ratings and np.isnan(ds.packed.ratings[:3]).all()  # implicit feedback
    assert isinstance(ds.packed.items, np.memmap)  # memory-mapped, not read
    # The k-core filter held: every user and every item has at least 5 events.
    assert ds.packed.lengths.min() >= 5
    assert np.bincount(np.asarray(ds.packed.items))[1:].min() >= 5
    # Most users straddle the cut: the test split has them.
    assert (split_targets(ds.packed, Split.TEST, cfg.data.split) >= 1).mean() > 0.8

    # Asked for with other options, the prepared dataset is refused, naming them.
    other = load_config(example, ["data.min_user_events=3"]).data.spec()
    with pytest.raises(NotPrepared, match="min_user_events"):
        open_prepared(other)
    # An input changed since: refused.
    events = Path(cfg.data.dataset)
    os.utime(events, ns=(1, 1))
    with pytest.raises(NotPrepared, match="changed since it was prepared"):
        open_prepared(cfg.data.spec())
    main(["--config", str(example)])  # touched, same bytes: the sha256 says so, nothing is parsed again
    assert open_prepared(cfg.data.spec()).manifest.created_at == ds.manifest.created_at


def test_training_refuses_an_unprepared_dataset_and_names_the_command(example: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "training.train", "--config", str(example), "run.epochs=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "is not prepared" in done.stderr
    assert f"python -m data.prepare --config {example}" in done.stderr
    assert not (example.parent / "runs").exists()  # nothing started


def test_the_example_trains_end_to_end(example: Path) -> None:
    """Parquet with mapped columns, implicit feedback, k-core, temporal split: prepared (as `make train`
    does first), trained, evaluated on the temporal test split and exported."""
    run = torchrun(example.parent, "own", "run.epochs=1", "run.steps_per_epoch=4", "model.num_blocks=1",
                   nproc=1, file=example.name)
    metrics = yaml.safe_load((run / "metrics.json").read_text())
    assert 0 <= metrics["test/hr@10"] <= 1
    # The export carries every prepared user's whole history, as the prepared arrays hold it.
    dataset, histories = open_prepared(load_config(example).data.spec()), load_artifact(run / "export").histories
    assert len(histories) == dataset.num_users
    for user in (0, dataset.num_users - 1):
        lo, hi = dataset.packed.offsets[user], dataset.packed.offsets[user + 1]
        items, stamps = histories.get(str(dataset.raw_users.iloc[user]))
        assert items.tolist() == dataset.packed.items[lo:hi].tolist()
        assert stamps.tolist() == dataset.packed.timestamps[lo:hi].tolist()


def test_bench_epoch_times_one_whole_epoch_and_a_sampled_validation(example: Path) -> None:
    """`make bench-epoch` on the example: the row counts every step of the epoch and the sampled users."""
    main(["--config", str(example)])
    ds = open_prepared(load_config(example).data.spec())
    done = subprocess.run([sys.executable, "-m", "benchmarks.epoch", "--config", str(example), "data.batch_size=512",
                           "data.valid_users=300", "model.num_blocks=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    row = done.stdout.strip().splitlines()[-2].strip("|").split("|")
    steps, valid_users = int(row[0].replace(",", "")), int(row[4].replace(",", ""))
    assert steps == -(-ds.num_users // 512)  # every user of the epoch, the last batch partial
    assert valid_users == 300
    assert f"benchmarks.epoch --config {example}" in done.stdout
    assert not (example.parent / "runs").exists()  # its run directory was temporary
