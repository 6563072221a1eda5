"""The training loop for real: torchrun, gloo, DMP, TrainPipelineSparseDist, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config import ShardingKind, load_config

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"dataset": "synthetic", "max_len": 20, "batch_size": 32, "eval_batch_size": 128,
             "num_negatives": 64},
    "model": {"max_seq_len": 20, "embedding_dim": 16, "attention_dim": 8, "linear_dim": 8, "num_blocks": 2,
              "rating_embeddings": True},
    "optim": {"lr": 3.0e-3, "sparse_lr": 0.05},
    "sharding": {"tables": {"item_table": "row_wise", "rating_table": "table_wise"}},
    "run": {"epochs": 1, "tensorboard": False, "topk": 10, "keep_checkpoints": 3},
}


def torchrun(tmp: Path, name: str, *overrides: str, nproc: int = 2, resume: bool = False) -> Path:
    config = tmp / "tiny.yaml"
    if not config.exists():
        cfg = json.loads(json.dumps(TINY))
        cfg["data"]["root"] = str(tmp / "datasets")
        cfg["run"]["out_dir"] = str(tmp / "runs")
        config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "training.train", "--config", str(config), f"run.name={name}", *overrides]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return tmp / "runs" / name


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("train")
    full = torchrun(tmp, "full", "run.max_steps=12")
    stopped = torchrun(tmp, "resumed", "run.max_steps=7")
    losses_before_resume = step_losses(stopped)
    resumed = torchrun(tmp, "resumed", "run.max_steps=12", resume=True)
    return {"full": full, "resumed": resumed, "before_resume": losses_before_resume}


def test_two_ranks_shard_one_table_row_wise_and_one_table_wise(runs):
    plan = (runs["full"] / "plan.txt").read_text()
    rows: dict[str, str] = {}
    for line in plan.splitlines():  # the first table of the plan: param | sharding type | kernel | ranks
        if line.startswith(("item_table ", "rating_table ")):
            rows.setdefault(line.split()[0], line)
    assert "row_wise" in rows["item_table"] and "[0, 1]" in rows["item_table"], plan  # rows split over both ranks
    assert "table_wise" in rows["rating_table"], plan


def test_loss_falls(runs):
    losses = step_losses(runs["full"])
    assert len(losses) == 12
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.3, losses


def test_resume_continues_exactly(runs):
    full = step_losses(runs["full"])
    before = runs["before_resume"]
    assert sorted(before) == list(range(1, 8))
    resumed = step_losses(runs["resumed"])
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, resumed, full)


def test_run_outputs(runs):
    run = runs["full"]
    for name in ("config.yaml", "metrics.json", "predictions.parquet", "export/config.json", "plan.txt"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/hr@10"] <= 1.0
    assert metrics["test/hr@10"] <= metrics["test/hr@50"] <= metrics["test/hr@200"]


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epochs=3", "sharding.tables={item_table: row_wise}"])
    assert cfg.run.epochs == 3 and cfg.sharding.tables == {"item_table": ShardingKind.ROW_WISE}
    assert cfg.model.num_blocks == 2 and cfg.data.max_len == 200
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epoch=3"])
    with pytest.raises(ValueError, match="expected int"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epochs=three"])
    with pytest.raises(ValueError, match="not one of"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["optim.sparse_optimizer=lamb"])
