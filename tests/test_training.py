"""The training loop for real (torchrun, gloo, DMP, TrainPipelineSparseDist): its outputs, and what a
kill leaves behind. Several ranks against one: tests/test_rank_equivalence.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch import (
    ENV,
    ROOT,
    TIMEOUT_S,
    TINY,
    command,
    epoch_records,
    step_losses,
    summary,
    torchrun,
    write_config,
)
from training.checkpoint import latest, read_progress
from training.config import ShardingKind, load_config

ONE = {**TINY, "sharding": {}, "run": {**TINY["run"], "epochs": 2, "checkpoint_every": 4}}
"""One process, two whole epochs of ~32 steps, a checkpoint every 4 steps."""


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def unbroken(tmp: Path) -> Path:
    return torchrun(tmp, "unbroken", nproc=1, config=ONE)


def test_run_outputs(unbroken: Path) -> None:
    for name in ("config.yaml", "metrics.json", "predictions.parquet", "export/config.json", "plan.txt",
                 "checkpoints/best"):
        assert (unbroken / name).exists(), name
    records, written = epoch_records(unbroken), summary(unbroken)
    best = max(records, key=lambda r: r["valid/ndcg@10"])  # the first of equals, as the trainer keeps it
    assert written["best_epoch"] == best["epoch"] and written["valid_ndcg@10"] == best["valid/ndcg@10"]
    marker = (unbroken / "checkpoints" / "best").read_text().strip()
    assert read_progress(unbroken / "checkpoints" / marker).global_step == best["global_step"]


def test_a_kill_loses_no_logged_step_and_resume_continues_exactly(tmp: Path, unbroken: Path) -> None:
    """kill -9 mid-epoch: every step finished before the kill is in steps.jsonl (it was block-buffered and
    lost them); the resumed run logs each step once, with the unbroken run's losses."""
    config = write_config(tmp, ONE, "one.yaml")
    proc = subprocess.Popen(command(config, "killed", nproc=1), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp / "runs" / "killed"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoints = run / "checkpoints"
        if (c := latest(checkpoints)) is not None and read_progress(c).global_step >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = read_progress(latest(run / "checkpoints")).global_step
    logged = step_losses(run)
    assert sorted(logged) == list(range(1, len(logged) + 1)) and len(logged) >= saved, (saved, sorted(logged))

    resumed = torchrun(tmp, "killed", nproc=1, resume=True, file="one.yaml")
    full, again = step_losses(unbroken), step_losses(resumed)
    assert sorted(again) == sorted(full)
    for step in full:
        assert again[step] == pytest.approx(full[step], rel=1e-5), step
    assert [r["epoch"] for r in epoch_records(resumed)] == [0, 1]
    assert summary(resumed) == pytest.approx(summary(unbroken), rel=1e-5)


KILL_AFTER_COMMIT = """
import os, sys
from training import checkpoint
write = checkpoint.write_best_marker
def killed_before_the_marker(root, progress):
    if progress.best_step == progress.global_step and progress.best_epoch >= 1:
        os._exit(9)  # the new best checkpoint is committed; its marker is not written
    write(root, progress)
checkpoint.write_best_marker = killed_before_the_marker
from training.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_the_commit_and_the_best_marker_leaves_one_story(tmp: Path) -> None:
    """The run is killed right after a new best epoch's checkpoint is committed, before the ``best`` marker
    moves. Resumed, its metrics.json, ``best``, export and metrics.jsonl must all tell the same story
    as a run that was never killed (it named one epoch best and evaluated another, and lost a line)."""
    config = {**TINY, "sharding": {}, "run": {**TINY["run"], "epochs": 4, "steps_per_epoch": 4}}
    path = write_config(tmp, config, "best.yaml")
    args = command(path, "interrupted", nproc=1)[args_start(path):]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_COMMIT, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 9, f"no later epoch was a new best, or it failed:\n{proc.stderr[-3000:]}"
    resumed = torchrun(tmp, "interrupted", nproc=1, resume=True, file="best.yaml")
    clean = torchrun(tmp, "clean", nproc=1, file="best.yaml")
    assert [r["epoch"] for r in epoch_records(resumed)] == [0, 1, 2, 3]
    assert summary(resumed) == pytest.approx(summary(clean), rel=1e-5)
    assert (resumed / "checkpoints" / "best").read_text() == (clean / "checkpoints" / "best").read_text()


def args_start(config: Path) -> int:
    """Where training.train's own arguments begin in ``command``'s list (after torchrun's)."""
    return command(config, "x", nproc=1).index("--config")


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epochs=3", "sharding.tables={item_table: row_wise}"])
    assert cfg.run.epochs == 3 and cfg.sharding.tables == {"item_table": ShardingKind.ROW_WISE}
    assert cfg.model.num_blocks == 2 and cfg.model.max_seq_len == 200
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epoch=3"])
    with pytest.raises(ValueError, match="expected int"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["run.epochs=three"])
    with pytest.raises(ValueError, match="not one of"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["optim.sparse_optimizer=lamb"])
    # One name per knob: the window was also data.max_len, which nothing checked against the model's.
    with pytest.raises(ValueError, match="data.max_len is gone: the sequence window is model.max_seq_len"):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", ["data.max_len=100"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.max_seq_len >= 1 and cfg.data.batch_size >= 1


def test_a_config_typo_is_one_line_with_the_closest_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(ROOT / "configs/ml-1m/hstu.yaml"),
                           "run.epoch=3"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: unknown config key 'epoch' (did you mean 'epochs'?) in run." in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quiet_logs_by_default(unbroken: Path) -> None:
    """The unbroken run's log (stderr) holds no planner tables, FBGEMM argument dumps or known-harmless
    warnings; --verbose would show them (training/logs.py)."""
    config = unbroken.parent.parent / "quiet.yaml"
    write_config(unbroken.parent.parent, {**TINY, "sharding": {}}, "quiet.yaml")
    proc = subprocess.run(command(config, "quiet", "run.max_steps=2", nproc=1), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("planner.stats", "SplitTableBatchedEmbeddingBagsCodegen", "FutureWarning", "is_fx_tracing"):
        assert noise not in proc.stderr, noise
    assert "run directory" in proc.stderr
    assert yaml.safe_load((unbroken.parent / "quiet" / "config.yaml").read_text())["run"]["name"] == "quiet"
