"""Evaluation: rank each user's target against all items, as generative-recommenders does.

The user's history items and the padding row are removed from the ranking; HR@{1,10,50,200},
NDCG@{10,50,200} and MRR are summed over users on every rank and all-reduced.

``make eval`` evaluates a finished (or running) run's best checkpoint on the test target with exactly
the training-time protocol, so its HR/NDCG/MRR equal the run's ``metrics.json``; it adds coverage,
popularity bias, metrics by history length and two baselines on the same split, and writes everything
under ``runs/<name>/eval/`` (the training-time ``metrics.json`` and ``predictions.parquet`` stay as
they were):

    python -m training.evaluate --run runs/latest                      # what `make eval` runs
    python -m training.evaluate --run runs/<name> --baseline-run runs/<sasrec-run>
    python -m training.evaluate --run runs/<name> --checkpoint latest --baseline-run none

``eval/`` holds ``metrics.json`` (the run's test/* metrics, ``test/coverage@10``,
``test/popularity_bias@10``, ``by_history_length``, and the same for each baseline under
``baselines``) and one predictions file per model: ``predictions.parquet`` (the run),
``predictions-most_popular.parquet``, ``predictions-sasrec.parquet``. Each has the columns of the
training-time file (``user_id``, ``target_item``, ``topk``: raw ids) plus ``rank`` (the exact rank of
the target, the one the metrics use), ``history_length`` (events before the target, before truncation
to the model's ``max_seq_len``), ``target_score`` and ``topk_scores``.

Baselines: most-popular (popularity = training interaction counts, see ``training.analysis``) always;
SASRec from ``--baseline-run``, or by default ("auto") the sibling run directory (same parent folder)
whose config has ``model.encoder: sasrec`` and the same ``data.dataset`` and that has a best checkpoint,
the most recently updated one when there are several (none when the evaluated run is SASRec itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from data.batch import SeqBatch
from data.loader import make_dataloader
from data.prepare import PreparedDataset, open_prepared
from data.splits import Split, SplitConfig, split_targets
from models.config import EncoderType
from models.metrics import RankingMetrics, rank_items
from models.recommender import GenerativeRecommender
from training import analysis, checkpoint, logs
from training.config import SparseOptimizer, TrainConfig, load_config
from training.distributed import DistContext, cleanup, init_process_group, shard_model

log = logging.getLogger("training.evaluate")

EVAL_DIR = "eval"
BEYOND_K = 10
"""The K of coverage@K and popularity bias@K."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """Under the batches' seen-items rule (``SeqBatch.seen``)."""
    window_metrics: dict[str, float]
    """With only the window's items removed: generative-recommenders' protocol (the same numbers when
    the batches carry no longer history)."""
    user_ids: torch.Tensor | None = None
    """[U] dense user index of each row of ``topk`` (this rank's users only)."""
    targets: torch.Tensor | None = None
    topk: torch.Tensor | None = None
    """[U, K] dense item ids, best first, history removed."""
    ranks: torch.Tensor | None = None
    """[U] the target's exact 1-based rank, the one the metrics are computed from."""
    target_scores: torch.Tensor | None = None
    """[U] the model's score of the target."""
    topk_scores: torch.Tensor | None = None
    """[U, K] the scores of ``topk``."""


@torch.no_grad()
def evaluate(
    model: GenerativeRecommender,
    batches: Iterable[SeqBatch],
    num_items: int,
    device: torch.device,
    *,
    topk: int = 0,
    block_scores: int = 1 << 26,
) -> EvalResult:
    """Metrics over all users (every rank must call this together; rows with user_ids < 0 are
    padding that keeps ranks in step and are ignored). With ``topk`` > 0 the K best items of each of
    this rank's users, with the target ranks and scores, stay on this rank (``write_predictions``
    writes them per rank): the metrics are the only thing the ranks exchange. Scores are held for at
    most ``block_scores`` (user, item) pairs at a time (``models.metrics.rank_items``)."""
    was_training = model.training
    model.eval()
    items = model.embed_items(torch.arange(1, num_items + 1, device=device)).float()
    table = torch.cat([items.new_zeros(1, items.shape[1]), items])  # row 0: padding, never ranked
    acc, window = RankingMetrics(device=device), RankingMetrics(device=device)
    kept: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        longer = batch.seen_ids is not None  # the rows carry history beyond the window
        ranked = rank_items(model.encode(batch).float(), table, batch.targets(), batch.seen(),
                            (batch.item_ids(), batch.lengths) if longer else None, k=topk,
                            block_scores=block_scores)
        keep = batch.user_ids >= 0
        acc.update(ranked.ranks[keep])
        window.update(ranked.window_ranks[keep])
        if topk:
            kept.append(tuple(t[keep].cpu() for t in (batch.user_ids, batch.targets(), ranked.top_items,
                                                      ranked.ranks, ranked.target_scores, ranked.top_scores)))
    totals = torch.stack([acc.totals(), window.totals()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    result = EvalResult(RankingMetrics.from_totals(totals[0]), RankingMetrics.from_totals(totals[1]))
    if topk:
        (result.user_ids, result.targets, result.topk, result.ranks, result.target_scores,
         result.topk_scores) = (torch.cat(column) for column in zip(*kept, strict=True))
    model.train(was_training)
    return result


def predictions_frame(
    result: EvalResult, dataset: PreparedDataset, *, detailed: bool = False, split: Split = Split.TEST,
    split_config: SplitConfig | None = None,
) -> pd.DataFrame:
    """One row per user, ordered by dense user index: raw ``user_id``, raw ``target_item`` and ``topk``
    (raw item ids, best first). ``detailed`` adds ``rank``, ``history_length`` (events before the
    target in ``split`` under ``split_config``, before truncation to ``max_seq_len``), ``target_score`` and
    ``topk_scores``."""
    assert result.topk is not None and result.user_ids is not None and result.targets is not None
    # Dense item ids are 1..num_items in order, so dense id i is row i - 1 (0, padding, never appears);
    # indexing the column itself keeps its dtype (a None slot for padding would turn int ids to float).
    raw_item = dataset.items.sort_values("item_id")["raw_item"].to_numpy()
    order = torch.argsort(result.user_ids)
    users = result.user_ids[order].numpy()
    frame = pd.DataFrame({
        "user_id": dataset.raw_users.to_numpy()[users],
        "target_item": raw_item[result.targets[order].numpy() - 1],
        "topk": list(raw_item[result.topk[order].numpy() - 1]),
    })
    if detailed:
        assert result.ranks is not None and result.target_scores is not None and result.topk_scores is not None
        frame["rank"] = result.ranks[order].numpy()
        frame["history_length"] = split_targets(dataset.packed, split, split_config or SplitConfig())[users]
        frame["target_score"] = result.target_scores[order].numpy()
        frame["topk_scores"] = list(result.topk_scores[order].numpy())
    return frame


def write_predictions(result: EvalResult, dataset: PreparedDataset, path: Path) -> None:
    """predictions.parquet: raw user id, raw target item, top-K raw item ids (best first), this rank's
    users (every rank calls it; see ``write_frame``). No rank ever holds the lists of all users."""
    write_frame(predictions_frame(result, dataset), path)


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """Every rank writes its rows of one table: with one rank ``path`` is the file; with N it is a
    folder of ``part-<rank>-of-<N>.parquet``, which pandas (``pd.read_parquet(path)``), pyarrow and
    DuckDB read as one table. What was at ``path`` (a file, or the parts of a run on another number of
    ranks) is removed first."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        _remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        return
    rank = dist.get_rank()
    if rank == 0:
        _remove(path)
        path.mkdir(parents=True)
    dist.barrier()
    frame.to_parquet(path / f"part-{rank:05d}-of-{world:05d}.parquet", index=False)
    dist.barrier()  # all parts are there when any rank returns


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- `make eval`: a run's checkpoint, the analysis and the baselines ---------------------------
def eval_loader(cfg: TrainConfig, dataset: PreparedDataset, ctx: DistContext):
    """The test split exactly as training evaluates it (``Trainer.loader(Split.TEST, epoch=0)``)."""
    return make_dataloader(
        dataset,
        Split.TEST,
        batch_size=cfg.data.eval_batch_size,
        max_seq_len=cfg.model.max_seq_len,
        num_negatives=0,
        shuffle=False,
        seed=cfg.run.seed,
        epoch=0,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=cfg.data.num_workers,
        exclude_validation_from_train=cfg.data.exclude_validation_from_train,
        seen=cfg.data.exclude_seen,
        split_config=cfg.data.split,
    )


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """"best" (the checkpoint named by ``checkpoints/best``), "latest", or a checkpoint directory
    (a name under ``checkpoints/`` or a path)."""
    root = run_dir / "checkpoints"
    if which == "best":
        best = root / "best"
        if not best.is_file():
            raise FileNotFoundError(f"{best} does not exist: no epoch of this run has been evaluated yet "
                                    "(pass --checkpoint latest to evaluate its newest checkpoint)")
        path = root / best.read_text().strip()
    elif which == "latest":
        path = checkpoint.latest(root)
        if path is None:
            raise FileNotFoundError(f"{root} holds no finished checkpoint")
    else:
        path = root / which if (root / which).is_dir() else Path(which)
    if not (path / "progress.json").is_file():
        # The trainer keeps only the newest run.keep_checkpoints checkpoints, and its pruning does not
        # spare the best one: `best` can name a checkpoint that no longer exists.
        raise FileNotFoundError(f"{path} is not a finished checkpoint: pruned by the trainer (it keeps the newest "
                                "run.keep_checkpoints only)? --checkpoint latest evaluates the newest one")
    return path


def evaluate_checkpoint(
    cfg: TrainConfig, dataset: PreparedDataset, path: Path, ctx: DistContext, *, topk: int, trust: bool = False
) -> EvalResult:
    """Builds the run's model on meta, shards it over this process group, loads ``path`` into it (DCP
    reshards a checkpoint written by any number of ranks) and evaluates the test split."""
    model = GenerativeRecommender(cfg.model, dataset.num_items, device=torch.device("meta"))
    # Nothing steps an optimizer here, and the fused one is part of the sharded module: SGD is the
    # kernel every device has (a run trained with Adam on GPU then loads on a CPU) and it holds no state.
    optim = dataclasses.replace(cfg.optim, sparse_optimizer=SparseOptimizer.SGD)
    dmp, _ = shard_model(model, ctx, cfg.sharding, optim)
    checkpoint.load(path, dmp, None, trust=trust)
    result = evaluate(dmp.module, eval_loader(cfg, dataset, ctx), dataset.num_items, ctx.device, topk=topk)
    del dmp, model
    gc.collect()  # release the sharded modules before the next model or the process group goes
    return result


def find_sasrec_run(run_dir: Path, cfg: TrainConfig) -> Path | None:
    """The SASRec baseline of ``run_dir``: the sibling run (same parent folder, not a symlink such as
    ``latest``) with ``model.encoder: sasrec``, the same ``data.dataset`` and a best checkpoint; the
    most recently updated when there are several. None for a SASRec run or when there is none."""
    if cfg.model.encoder is EncoderType.SASREC:
        return None
    here = run_dir.resolve()
    found: list[Path] = []
    for sibling in sorted(here.parent.iterdir()):
        if sibling == here or sibling.is_symlink() or not (sibling / "checkpoints" / "best").is_file():
            continue
        try:
            other = load_config(sibling / "config.yaml")
        except (OSError, ValueError) as e:  # no config, or one written by an older version
            log.debug("skipping %s as a baseline: %s", sibling, e)
            continue
        if other.model.encoder is EncoderType.SASREC and other.data.dataset == cfg.data.dataset:
            found.append(sibling)
    return max(found, key=lambda p: (p / "checkpoints" / "best").stat().st_mtime, default=None)


def summarize(
    result: EvalResult, dataset: PreparedDataset, popular: np.ndarray, split_config: SplitConfig | None = None
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics.json entry, this rank's detailed predictions) of one model's test evaluation.

    Every rank calls it together: coverage, popularity bias and the history-length table come from
    counts that the ranks add up (one all-reduce of ~num_items numbers), not from everyone's lists."""
    assert result.topk is not None and result.ranks is not None
    predictions = predictions_frame(result, dataset, detailed=True, split_config=split_config)
    top = result.topk[:, :BEYOND_K]
    by_length = analysis.history_length_totals(predictions["rank"], predictions["history_length"])
    totals = torch.cat([
        torch.bincount(top.reshape(-1), minlength=dataset.num_items + 1).double(),
        torch.tensor([float(np.isin(top.numpy(), popular).sum()), float(top.numel()), float(len(result.ranks))],
                     dtype=torch.float64),
        torch.from_numpy(by_length.ravel()),
    ])
    if dist.is_initialized():
        dist.all_reduce(totals)
    recommended, (popular_slots, slots, users), by_length = totals.split(
        [dataset.num_items + 1, 3, by_length.size])
    summary: dict[str, Any] = {f"test/{k}": v for k, v in result.metrics.items()}
    summary |= {f"test/window/{k}": v for k, v in result.window_metrics.items()}
    summary[f"test/coverage@{BEYOND_K}"] = (recommended[1:] > 0).sum().item() / dataset.num_items
    summary[f"test/popularity_bias@{BEYOND_K}"] = (popular_slots / slots).item()
    summary["users"] = int(users.item())
    table = analysis.history_length_frame(by_length.reshape(-1, 4).numpy())
    summary["by_history_length"] = table.to_dict("records")
    return summary, predictions


def evaluate_run(
    run_dir: Path,
    ctx: DistContext,
    *,
    checkpoint_name: str = "best",
    baseline_run: str = "auto",
    out_dir: Path | None = None,
    trust: bool = False,
) -> dict[str, Any] | None:
    """Evaluates ``run_dir`` and its baselines on the test split, writes ``out_dir`` (default
    ``run_dir/eval``) and returns the metrics.json content (on rank 0; None on the others)."""
    cfg = load_config(run_dir / "config.yaml")
    dataset = open_prepared(cfg.data.spec())
    path = resolve_checkpoint(run_dir, checkpoint_name)
    # Coverage@10 needs at least 10 items per user; the lists otherwise follow the training-time length.
    topk = max(cfg.run.topk, BEYOND_K)
    log.info("evaluating %s (%s) on the %s test split", run_dir, path.name, dataset.name)
    results = {"model": evaluate_checkpoint(cfg, dataset, path, ctx, topk=topk, trust=trust)}

    train_ends = split_targets(dataset.packed, Split.TRAIN, cfg.data.split,
                               exclude_validation_from_train=cfg.data.exclude_validation_from_train) + 1
    counts = analysis.packed_item_popularity(dataset.packed, dataset.num_items, train_ends)
    popular = analysis.popular_items(counts)
    baseline = analysis.MostPopular(counts).to(ctx.device)
    results["most_popular"] = evaluate(baseline, eval_loader(cfg, dataset, ctx), dataset.num_items, ctx.device,
                                       topk=topk)
    sasrec = find_sasrec_run(run_dir, cfg) if baseline_run == "auto" else (
        None if baseline_run == "none" else Path(baseline_run))
    sasrec_info: dict[str, str] = {}
    if sasrec is not None:
        sasrec_cfg = load_config(sasrec / "config.yaml")
        sasrec_data = open_prepared(sasrec_cfg.data.spec())
        if sasrec_data.manifest.checksum != dataset.manifest.checksum:
            raise ValueError(f"baseline run {sasrec} was trained on other data than {run_dir}")
        sasrec_path = resolve_checkpoint(sasrec, "best")
        log.info("baseline: evaluating %s (%s)", sasrec, sasrec_path.name)
        results["sasrec"] = evaluate_checkpoint(sasrec_cfg, sasrec_data, sasrec_path, ctx, topk=topk, trust=trust)
        sasrec_info = {"run": str(sasrec), "checkpoint": sasrec_path.name,
                       "encoder": sasrec_cfg.model.encoder.value}
    out_dir = out_dir or run_dir / EVAL_DIR
    if ctx.is_main:  # e.g. a SASRec baseline not evaluated this time; the other ranks wait in write_frame
        for stale in out_dir.glob("predictions-*.parquet"):
            _remove(stale)
    summaries = {}
    for name, result in results.items():
        summary, predictions = summarize(result, dataset, popular, cfg.data.split)
        file = "predictions.parquet" if name == "model" else f"predictions-{name}.parquet"
        write_frame(predictions, out_dir / file)
        summaries[name] = (file, summary)
    if not ctx.is_main:
        return None
    test_at = split_targets(dataset.packed, Split.TEST, cfg.data.split)
    tested = test_at >= 1
    test_targets = np.asarray(dataset.packed.items[dataset.packed.offsets[:-1][tested] + test_at[tested]])
    progress = json.loads((path / "progress.json").read_text())
    report: dict[str, Any] = {
        "run": str(run_dir), "checkpoint": path.name, "checkpoint_step": progress["global_step"],
        # progress.json holds the epoch in progress: one past the last finished one at an epoch end.
        "checkpoint_epoch": progress["epoch"] - (progress["step_in_epoch"] == 0), "encoder": cfg.model.encoder.value,
        "dataset": dataset.name, "split": str(Split.TEST), "users": summaries["model"][1].pop("users"),
        "items": dataset.num_items, "popular_items": int(len(popular)),
        "targets_popular_share": analysis.popular_share(test_targets, popular),
        "predictions": "predictions.parquet", "baselines": {},
    }
    for name, (file, summary) in summaries.items():
        if name == "model":
            report.update(summary)
        else:
            summary.pop("users")
            report["baselines"][name] = {**(sasrec_info if name == "sasrec" else {}), "predictions": file, **summary}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    return report


def _plain(value: Any) -> Any:
    """JSON for the numpy scalars pandas leaves in records."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def summary_table(report: dict[str, Any]) -> str:
    """The headline numbers of a metrics.json report, one line per model."""
    names = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr", f"coverage@{BEYOND_K}",
             f"popularity_bias@{BEYOND_K}"]
    rows = [(f"{report['encoder']} ({Path(report['run']).name})", report)]
    rows += list(report["baselines"].items())
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>9}" for n in names)]
    for label, metrics in rows:
        lines.append(f"{label:{width}}  " + "  ".join(f"{metrics[f'test/{n}']:9.4f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logs.setup(args.verbose)
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{run_dir} is not a run directory (no config.yaml)")
    ctx = init_process_group(args.device or load_config(run_dir / "config.yaml").run.device)
    try:
        report = evaluate_run(run_dir, ctx, checkpoint_name=args.checkpoint, baseline_run=args.baseline_run,
                              out_dir=Path(args.out) if args.out else None, trust=args.trust_checkpoint)
        if report is not None:
            print(summary_table(report))
            print(f"wrote {Path(args.out) if args.out else run_dir / EVAL_DIR}")
    finally:
        gc.collect()
        cleanup()
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/latest", help="the run directory (default: runs/latest)")
    ap.add_argument("--checkpoint", default="best",
                    help='"best" (default), "latest", or a checkpoint name under checkpoints/ or a path')
    ap.add_argument("--baseline-run", default="auto",
                    help='the SASRec run to compare with: a run directory, "auto" (default: a sibling run '
                         'with model.encoder: sasrec) or "none"')
    ap.add_argument("--out", help="output directory (default: <run>/eval)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's run.device")
    ap.add_argument("--verbose", action="store_true", help="also the libraries' INFO logs (training/logs.py)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load checkpoints whose signature does not verify (checkpoints are pickles: loading one "
                         "runs code it carries; see training/checkpoint.py)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
