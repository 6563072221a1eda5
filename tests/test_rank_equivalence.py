"""N ranks = 1 rank: two processes training on the same global batch take the same steps as one.

For every sharding kind (the item and the rating table both laid out that way) two gloo processes
train 2 epochs of 4 steps with a global batch of 64, evaluate on the validation target after each
epoch, load the best epoch's checkpoint in ``finish()``, evaluate the test target and export. One
process does the same with the planner's layout. Then, against the one process:
- the loss of every step agrees to a relative 1e-4 (float sums in another order, nothing more; a
  different init, negative pool, batch or gradient scale moves it by 1e-2 and more);
- the validation metrics of each epoch, the best epoch, the test metrics (1e-3, a handful of rank
  flips among 1,000 users at most) and the exported item table (1e-5) agree.
Data-parallel tables need CUDA (FBGEMM's CPU kernel is broken for them): here only their clear error;
their equivalence runs on GPUs (``tests/test_gpu_training.py``).
Dropout is 0 (its masks differ per rank by design) and the embeddings use SGD (row-wise Adagrad sums
squared gradients over a column-wise shard's columns only, so column-wise sharding changes that rule).
The default CPU optimizer, row-wise Adagrad, is compared on the layout that leaked on two GPUs (item
table row-wise, rating table table-wise), and that run is also stopped and resumed on two ranks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serving.artifact import load_artifact
from tests.launch import TINY, epoch_records, step_losses, summary, torchrun
from training.config import ShardingKind

CONFIG = {
    **TINY,
    "data": {**TINY["data"], "batch_size": 64},
    "model": {**TINY["model"], "dropout": 0.0},
    "optim": {"lr": 3.0e-3, "sparse_optimizer": "sgd", "sparse_lr": 0.1},
    "sharding": {},
    "run": {**TINY["run"], "epochs": 2, "steps_per_epoch": 4, "keep_checkpoints": 1},
}
STEPS = 8
LOSS_RTOL = 1e-4
METRIC_ATOL = 1e-3
TABLE_ATOL = 1e-5
ADAGRAD = "optim.sparse_optimizer=rowwise_adagrad"
LEAKED_LAYOUT = "sharding.tables={item_table: row_wise, rating_table: table_wise}"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def one(tmp) -> Path:
    return torchrun(tmp, "one", nproc=1, config=CONFIG)


@pytest.fixture(scope="module")
def one_adagrad(tmp) -> Path:
    return torchrun(tmp, "one-adagrad", ADAGRAD, nproc=1, config=CONFIG)


@pytest.fixture(scope="module")
def two_adagrad(tmp) -> Path:
    return torchrun(tmp, "two-adagrad", ADAGRAD, LEAKED_LAYOUT, nproc=2, config=CONFIG)


def plan_rows(run: Path) -> dict[str, str]:
    """The first table of plan.txt (param | sharding type | kernel | ranks), a line per table."""
    rows: dict[str, str] = {}
    for line in (run / "plan.txt").read_text().splitlines():
        if line.startswith(("item_table ", "rating_table ")):
            rows.setdefault(line.split()[0], line)
    return rows


def assert_same_training(one: Path, two: Path) -> None:
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), (step, a, b)
    for x, y in zip(epoch_records(one), epoch_records(two), strict=True):
        assert x["epoch"] == y["epoch"] and x.get("best") == y.get("best")
        for key in ("valid/hr@10", "valid/ndcg@10", "valid/mrr", "valid/hr@50"):
            assert y[key] == pytest.approx(x[key], abs=METRIC_ATOL), (key, x, y)
    summary_one, summary_two = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert summary_two["best_epoch"] == summary_one["best_epoch"]
    for key, value in summary_one.items():
        if key.startswith("test/"):
            assert summary_two[key] == pytest.approx(value, abs=METRIC_ATOL), (key, summary_one, summary_two)
    table_one, table_two = (load_artifact(run / "export").item_embeddings for run in (one, two))
    torch.testing.assert_close(table_two, table_one, atol=TABLE_ATOL, rtol=0)
    # Two ranks write a part each (a folder); read as one table, the same users, targets and lists.
    assert sorted(p.name for p in (two / "predictions.parquet").iterdir()) == [
        "part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    frames = [pd.read_parquet(run / "predictions.parquet").sort_values("user_id", ignore_index=True)
              for run in (one, two)]
    pd.testing.assert_frame_equal(frames[1][["user_id", "target_item"]], frames[0][["user_id", "target_item"]])
    agree = np.mean([(a[:10] == b[:10]).mean() for a, b in zip(frames[0]["topk"], frames[1]["topk"], strict=True)])
    assert agree > 0.95, agree  # the tables agree to TABLE_ATOL: a near-tie may swap two neighbours


@pytest.mark.parametrize("kind", [k for k in ShardingKind if k is not ShardingKind.DATA_PARALLEL])
def test_two_ranks_train_as_one(kind: ShardingKind, tmp: Path, one: Path) -> None:
    two = torchrun(tmp, f"two-{kind}", f"sharding.tables={{item_table: {kind}, rating_table: {kind}}}", nproc=2,
                   config=CONFIG)
    rows = plan_rows(two)
    assert kind.value in rows["item_table"] and kind.value in rows["rating_table"], rows
    if kind in (ShardingKind.ROW_WISE, ShardingKind.COLUMN_WISE):
        assert "[0, 1]" in rows["item_table"], rows  # the table really is on both ranks
    assert_same_training(one, two)


def test_row_wise_adagrad_with_the_rating_table_trains_as_one(one_adagrad: Path, two_adagrad: Path) -> None:
    rows = plan_rows(two_adagrad)
    assert "row_wise" in rows["item_table"] and "table_wise" in rows["rating_table"], rows
    assert_same_training(one_adagrad, two_adagrad)


def test_two_ranks_resume_exactly(tmp: Path, two_adagrad: Path) -> None:
    """Stopped after 3 steps (mid-epoch, a checkpoint), resumed on two ranks: the same run as unbroken."""
    torchrun(tmp, "two-resumed", ADAGRAD, LEAKED_LAYOUT, "run.max_steps=3", nproc=2, config=CONFIG)
    resumed = torchrun(tmp, "two-resumed", ADAGRAD, LEAKED_LAYOUT, nproc=2, resume=True, config=CONFIG)
    full, again = step_losses(two_adagrad), step_losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in full:
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, full, again)
    assert summary(resumed) == pytest.approx(summary(two_adagrad), abs=1e-6)


def test_data_parallel_on_cpu_fails_at_once_with_the_reason(tmp: Path) -> None:
    """It hung (rank 0's planner failed while rank 1 waited for its plan, then rank 0 waited in a barrier).
    On CPU it cannot work (FBGEMM's dense kernel pools sequence lookups); both ranks must say so and
    exit. Its equivalence on GPUs: tests/test_gpu_training.py."""
    start = time.monotonic()
    with pytest.raises(AssertionError, match="pytorch/FBGEMM#4586"):
        torchrun(tmp, "two-data_parallel", "sharding.tables={rating_table: data_parallel}", nproc=2, config=CONFIG)
    assert time.monotonic() - start < 60
