"""Runs ``training.train`` under torchrun (gloo, CPU) for the tests, bounded in time.

Every collective times out after ``run.collective_timeout_s`` (60 s here) and the whole run after
``TIMEOUT_S``, so a hang fails its test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

TINY = {
    "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 128,
             "num_negatives": 64},
    "model": {"max_seq_len": 20, "embedding_dim": 16, "attention_dim": 8, "linear_dim": 8, "num_blocks": 2,
              "rating_embeddings": True},
    "optim": {"lr": 3.0e-3, "sparse_lr": 0.05},
    "sharding": {"tables": {"item_table": "row_wise", "rating_table": "table_wise"}},
    "run": {"epochs": 1, "tensorboard": False, "topk": 10, "keep_checkpoints": 3, "collective_timeout_s": 60},
}


def write_config(tmp: Path, config: dict, file: str = "tiny.yaml") -> Path:
    cfg = json.loads(json.dumps(config))
    cfg["data"]["root"] = str(tmp / "datasets")
    cfg["run"]["out_dir"] = str(tmp / "runs")
    path = tmp / file
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, name: str, *overrides: str, nproc: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "training.train", "--config", str(config), f"run.name={name}", *overrides]
    return [*cmd, "--resume"] if resume else cmd


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def prepare_data(config: Path, *overrides: str) -> None:
    """What `make train` runs before training: ``python -m data.prepare --config`` (here in-process)."""
    from data.prepare import prepare
    from training.config import load_config

    prepare(load_config(config, [o for o in overrides if o.startswith("data.")]).data.spec())


def torchrun(tmp: Path, name: str, *overrides: str, nproc: int = 2, resume: bool = False,
             config: dict | None = None, file: str = "tiny.yaml") -> Path:
    """Prepares the data, then trains run ``name`` under ``tmp/runs`` with ``config`` (default ``TINY``)
    plus ``overrides``; fails the calling test with the run's output unless it exits 0 within ``TIMEOUT_S``."""
    path = tmp / file
    if not path.exists():
        write_config(tmp, config or TINY, file)
    prepare_data(path, *overrides)
    proc = subprocess.Popen(command(path, name, *overrides, nproc=nproc, resume=resume), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {name} hung: killed after {TIMEOUT_S} s\n{out[-3000:]}\n{err[-6000:]}") \
            from None
    assert proc.returncode == 0, f"torchrun {name} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
    return tmp / "runs" / name


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows}
    assert len(losses) == len(rows), f"{run}/steps.jsonl logs a step twice"
    return losses


def epoch_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict[str, float]:
    """The numbers of a run's metrics.json (its other entries name the protocol, e.g. exclude_seen)."""
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if isinstance(v, int | float)}
