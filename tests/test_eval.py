"""`make eval` (python -m training.evaluate) on tiny runs trained with torchrun: the same numbers as the
training-time evaluation of the same checkpoint, baselines found and computed as specified, and the
eval/ outputs complete."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data.prepare import PreparedDataset
from tests.launch import ROOT, torchrun
from training.config import load_config
from training.evaluate import find_sasrec_run, resolve_checkpoint

TRAIN = ("run.epochs=2", "run.steps_per_epoch=8")


def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sibling runs on the synthetic data, made once per pytest session (test_notebook reuses them):
    ``hstu`` trained on one process, and ``sasrec`` on two processes with the item table row-wise, so
    evaluating it in one process reshards its checkpoint (and it is ``hstu``'s SASRec baseline)."""
    base = tmp_path_factory.getbasetemp() / "eval-runs"
    done = base / "done"
    if not done.exists():
        base.mkdir(exist_ok=True)
        torchrun(base, "sasrec", *TRAIN, "model.encoder=sasrec", nproc=2)
        torchrun(base, "hstu", *TRAIN, nproc=1)
        done.touch()
    return {"hstu": base / "runs" / "hstu", "sasrec": base / "runs" / "sasrec"}


def run_eval(run: Path, *args: str) -> subprocess.CompletedProcess:
    """What `make eval RUN=<run> ARGS=...` runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--run", str(run), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"evaluate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    runs = tiny_runs(tmp_path_factory)
    proc = run_eval(runs["hstu"])
    report = json.loads((runs["hstu"] / "eval" / "metrics.json").read_text())
    return {**runs, "report": report, "stdout": proc.stdout}


def training_metrics(run: Path) -> dict[str, float]:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k.startswith("test/")}


def test_eval_equals_training_time_evaluation_of_the_same_checkpoint(evaluated):
    report = evaluated["report"]
    assert report["checkpoint"] == (evaluated["hstu"] / "checkpoints" / "best").read_text().strip()
    assert report["checkpoint_epoch"] == json.loads((evaluated["hstu"] / "metrics.json").read_text())["best_epoch"]
    expected = training_metrics(evaluated["hstu"])
    assert len(expected) == 16  # 8 under the run's seen-items rule, 8 with the window's (GR's protocol)
    assert {k: report[k] for k in expected} == expected  # same process count and batches: bit for bit


def test_sasrec_sibling_is_the_baseline_and_resharding_keeps_its_numbers(evaluated):
    sasrec = evaluated["report"]["baselines"]["sasrec"]
    assert Path(sasrec["run"]).resolve() == evaluated["sasrec"].resolve()
    assert sasrec["encoder"] == "sasrec"
    expected = training_metrics(evaluated["sasrec"])
    # Trained and evaluated at training time on 2 ranks, here resharded into 1: the same ranks, but each
    # rank summed its own users, so the float64 sums may differ in the last bits.
    assert {k: sasrec[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert "sasrec" in evaluated["stdout"] and "most_popular" in evaluated["stdout"]


def test_predictions_are_the_training_time_lists_plus_ranks(evaluated):
    run = evaluated["hstu"]
    trained = pd.read_parquet(run / "predictions.parquet")
    ours = pd.read_parquet(run / "eval" / "predictions.parquet")
    assert ours["user_id"].tolist() == trained["user_id"].tolist()
    assert ours["target_item"].tolist() == trained["target_item"].tolist()
    assert all(np.array_equal(a, b) for a, b in zip(ours["topk"], trained["topk"], strict=True))
    # The ranks are the ones the metrics came from.
    assert (ours["rank"] <= 10).mean() == evaluated["report"]["test/hr@10"]
    assert (1 / ours["rank"]).mean() == pytest.approx(evaluated["report"]["test/mrr"], rel=1e-12)
    # A target ranked within the list sits at that position, unless the history holds it too (then the
    # metrics still rank it, but the list leaves it out).
    cfg = load_config(run / "config.yaml")
    prepared = PreparedDataset.load(Path(cfg.data.root) / "synthetic")
    sequences = prepared.sequences.set_index("raw_user")
    raw = prepared.items.set_index("item_id")["raw_item"]
    checked = 0
    for row in ours[ours["rank"] <= 10].itertuples():
        seq = sequences.loc[row.user_id, "item_ids"]
        if raw[seq[-1]] in set(raw[seq[:-1]]):  # the run's rule: the whole history is seen
            continue
        assert row.topk[row.rank - 1] == row.target_item, row
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("rule", ["history", "window"])
def test_most_popular_baseline_equals_a_hand_computation(evaluated, rule):
    """Popularity from the training part of each sequence (all but the test target), ties to the smaller
    id, the seen items removed (the run's rule: the whole history; ``window/``: the last max_seq_len items,
    generative-recommenders' protocol), the target always ranked: recomputed here in plain Python."""
    cfg = load_config(evaluated["hstu"] / "config.yaml")
    prepared = PreparedDataset.load(Path(cfg.data.root) / "synthetic")
    sequences = prepared.sequences["item_ids"]
    num_items = len(prepared.items)
    counts: dict[int, int] = {}
    for seq in sequences:
        for item in seq[:-1]:
            counts[int(item)] = counts.get(int(item), 0) + 1
    order = sorted(range(1, num_items + 1), key=lambda i: (-counts.get(i, 0), i))
    ranks, top10 = [], set()
    for seq in sequences:
        before = seq[:-1] if rule == "history" else seq[:-1][-cfg.model.max_seq_len:]
        history, target = {int(i) for i in before}, int(seq[-1])
        candidates = [i for i in order if i not in history or i == target]
        ranks.append(candidates.index(target) + 1)
        top10.update([i for i in order if i not in history][:10])
    hr10 = sum(r <= 10 for r in ranks) / len(ranks)
    ndcg10 = sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / len(ranks)
    mrr = sum(1 / r for r in ranks) / len(ranks)

    baseline = evaluated["report"]["baselines"]["most_popular"]
    prefix = "test/" if rule == "history" else "test/window/"
    assert baseline[f"{prefix}hr@10"] == pytest.approx(hr10, abs=1e-12)
    assert baseline[f"{prefix}ndcg@10"] == pytest.approx(ndcg10, rel=1e-9)
    assert baseline[f"{prefix}mrr"] == pytest.approx(mrr, rel=1e-9)
    if rule == "history":  # the lists and their ranks follow the run's rule
        assert baseline["test/coverage@10"] == pytest.approx(len(top10) / num_items)
        predictions = pd.read_parquet(evaluated["hstu"] / "eval" / baseline["predictions"])
        assert predictions["rank"].tolist() == ranks
    assert sum(len(seq) - 1 > cfg.model.max_seq_len for seq in sequences) > 50  # the two rules differ here


def test_report_breakdowns_add_up(evaluated):
    report = evaluated["report"]
    buckets = pd.DataFrame(report["by_history_length"])
    assert buckets["users"].sum() == report["users"] == 1000
    # The bucket means, weighted by users, are the overall means.
    assert (buckets["hr@10"] * buckets["users"]).sum() / report["users"] == pytest.approx(report["test/hr@10"])
    assert 0 < report["test/coverage@10"] <= 1 and 0 <= report["test/popularity_bias@10"] <= 1
    assert report["popular_items"] == 5  # 1% of 499 items, rounded up
    # Every user of the most-popular baseline gets (almost) the same list: few items ever shown.
    assert report["baselines"]["most_popular"]["test/coverage@10"] < report["test/coverage@10"]


def test_checkpoint_resolution_and_errors(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(FileNotFoundError, match="no epoch of this run has been evaluated"):
        resolve_checkpoint(tmp_path / "run")
    for step in ("step-00000010", "step-00000020"):
        (root / step).mkdir(parents=True)
        (root / step / "progress.json").write_text("{}")
    (root / "best").write_text("step-00000010\n")
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000010"
    assert resolve_checkpoint(tmp_path / "run", "latest").name == "step-00000020"
    (root / "best").write_text("step-00000005\n")  # pruned by the trainer meanwhile
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_sasrec_baseline_discovery(tmp_path):
    def make(name: str, encoder: str, dataset: str = "ml-1m", best: bool = True) -> Path:
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset}, "model": {"encoder": encoder}}))
        if best:
            (run / "checkpoints" / "best").write_text("step-00000001\n")
        return run

    hstu = make("hstu", "hstu")
    make("sasrec-other-data", "sasrec", dataset="synthetic")
    make("sasrec-unfinished", "sasrec", best=False)
    older, newer = make("sasrec-a", "sasrec"), make("sasrec-b", "sasrec")
    os.utime(older / "checkpoints" / "best", (2e9, 2e9))  # the most recently updated wins
    (tmp_path / "latest").symlink_to("sasrec-b")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoints").mkdir()
    (tmp_path / "broken" / "checkpoints" / "best").write_text("x")
    (tmp_path / "broken" / "config.yaml").write_text("run: {unknown_key: 1}\n")

    assert find_sasrec_run(hstu, load_config(hstu / "config.yaml")) == older
    assert find_sasrec_run(newer, load_config(newer / "config.yaml")) is None  # a SASRec run has none
