"""`make train`: HSTU (or SASRec) on TorchRec-sharded embeddings through the pipelined loop.

    torchrun --standalone --nproc-per-node=2 -m training.train --config configs/ml-1m/hstu.yaml run.epochs=5

One process per GPU (or CPU process with gloo). Each epoch streams SeqBatches through
``TrainPipelineSparseDist`` (host-to-device copy and the embedding all-to-all of batch i+1 overlap
the forward/backward of batch i on GPU), evaluates on the validation target, checkpoints, and keeps
the best epoch by validation NDCG@10. At the end the best checkpoint is evaluated on the test
target, and predictions and the unsharded serving export are written.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from data.batch import SeqBatch
from data.loader import make_dataloader
from data.prepare import NotPrepared, PreparedDataset, open_prepared
from data.splits import Split
from models.recommender import GenerativeRecommender
from training import checkpoint, logs
from training.config import TrainConfig, load_config, save_config
from training.distributed import (
    DistContext,
    check_shared_directory,
    cleanup,
    describe_plan,
    init_process_group,
    make_optimizer,
    shard_model,
    sparse_optimizer_for,
)
from training.evaluate import evaluate, write_predictions
from training.export import export_run

log = logging.getLogger("training")
SELECT_METRIC = "ndcg@10"


@dataclass(repr=False)  # the default repr would print the model (and TorchRec's logging asks for it)
class Trainer:
    """The state of one training run on one rank."""

    cfg: TrainConfig
    ctx: DistContext
    run_dir: Path
    dataset: PreparedDataset
    model: torch.nn.Module  # DistributedModelParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: checkpoint.Progress
    pipeline: TrainPipelineSparseDist = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device,
                                                custom_model_fwd=self.forward)

    @property
    def net(self) -> GenerativeRecommender:
        return self.model.module  # type: ignore[return-value]

    def forward(self, batch: SeqBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training forward of one rank's batch: (loss to backpropagate, stats of the global batch)."""
        autocast = self.ctx.device.type == "cuda" and self.cfg.run.bf16
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return global_mean_loss(*self.model(batch))

    # --- one epoch --------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, p = self.cfg, self.progress
        loader = self.loader(Split.TRAIN, epoch, start_batch=p.step_in_epoch)
        steps = len(loader) + p.step_in_epoch
        if cfg.run.steps_per_epoch:
            steps = min(steps, cfg.run.steps_per_epoch)
        self.model.train()
        it = iter(loader)
        bar = tqdm(total=steps, initial=p.step_in_epoch, desc=f"epoch {epoch}", disable=not self.ctx.is_main,
                   dynamic_ncols=True, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        # Line-buffered: every finished step's line reaches the file at once (a kill loses none), and a
        # resumed run first drops the lines past its checkpoint (``_rewind_logs``), so none repeats.
        step_log = (self.run_dir / "steps.jsonl").open("a", buffering=1) if self.ctx.is_main else None
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        finished = False
        while not self.out_of_steps():
            if p.step_in_epoch >= steps:
                finished = True
                break
            try:
                stats = self.pipeline.progress(it)
            except StopIteration:
                finished = True
                break
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            p.step_in_epoch += 1
            p.global_step += 1
            loss = float(stats["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {p.global_step} (epoch {epoch}); "
                                         "lower optim.lr or check the data")
            loss_sum += loss
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}")
            if step_log is not None:
                step_log.write(json.dumps({"step": p.global_step, "epoch": epoch, "loss": loss, "lr": lr}) + "\n")
            if cfg.run.checkpoint_every and p.global_step % cfg.run.checkpoint_every == 0:
                self.save_checkpoint()
        finished = finished or p.step_in_epoch >= steps
        bar.close()
        if step_log is not None:
            step_log.close()
        # The pipeline may hold batches it prefetched past a step cap; drop them so the next epoch
        # (or evaluation) starts clean.
        self.pipeline.reset()
        return {"train_loss": loss_sum / max(n, 1), "train_steps": n, "epoch_time_s": time.perf_counter() - t0,
                "finished": finished}

    def out_of_steps(self) -> bool:
        return bool(self.cfg.run.max_steps) and self.progress.global_step >= self.cfg.run.max_steps

    def loader(self, split: Split, epoch: int, start_batch: int = 0):
        cfg = self.cfg.data
        train = split is Split.TRAIN
        return make_dataloader(
            self.dataset,
            split,
            batch_size=cfg.batch_size // self.ctx.world_size if train else cfg.eval_batch_size,
            max_seq_len=self.cfg.model.max_seq_len,
            num_negatives=cfg.num_negatives if train else 0,
            shuffle=train,
            seed=self.cfg.run.seed,
            epoch=epoch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=cfg.num_workers,
            start_batch=start_batch,
            exclude_validation_from_train=cfg.exclude_validation_from_train,
            seen=cfg.exclude_seen,
            split_config=cfg.split,
            sample_users=cfg.valid_users if split is Split.VALID else 0,
        )

    def evaluate(self, split: Split, *, with_topk: int = 0):
        # The pipeline rewrote the sharded modules' forward for its own prefetching; evaluation
        # calls them directly, so hand the original forwards back first (progress() re-attaches).
        self.pipeline.detach()
        return evaluate(self.net, self.loader(split, epoch=0), self.dataset.num_items, self.ctx.device,
                        topk=with_topk)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.run_dir / "checkpoints", self.model, self.optimizer, self.progress,
                               self.cfg.run.keep_checkpoints)

    def load_checkpoint(self, path: Path, *, weights_only: bool = False) -> checkpoint.Progress:
        return checkpoint.load(path, self.model, None if weights_only else self.optimizer,
                               trust=self.cfg.run.trust_checkpoints)


# --- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as e:  # once, without a traceback: every rank would print it otherwise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume:
        cfg.run.resume = True
    try:
        # Before the process group: preparing is a step of its own (`make data`), never work inside a
        # collective whose timeout would kill a long preparation. Every rank checks (a manifest and a stat).
        open_prepared(cfg.data.spec())
    except NotPrepared as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}.\nPrepare it first: {prepare_command(args)}", file=sys.stderr)
        return 2
    logs.setup(args.verbose)
    ctx = init_process_group(cfg.run.device, cfg.run.collective_timeout_s)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    trainer, ok = None, False
    try:
        trainer = build(cfg, ctx, args.config)
        fit(trainer)
        ok = True
    finally:
        # Release everything that holds process-group resources before destroying the group. After a
        # failure, no barrier: the other ranks are elsewhere, and torchrun stops them once this one exits.
        del trainer
        gc.collect()
        cleanup(ok)
    return 0


def build(cfg: TrainConfig, ctx: DistContext, config_path: str | None) -> Trainer:
    if cfg.data.batch_size % ctx.world_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is the global batch and must split evenly over "
                         f"{ctx.world_size} ranks")
    torch.manual_seed(cfg.run.seed + ctx.rank)
    # Memory-mapped on every rank: the page cache holds the events once per machine.
    dataset = open_prepared(cfg.data.spec())
    run_dir = resolve_run_dir(cfg, config_path, ctx)
    check_shared_directory(run_dir, ctx)
    torch.manual_seed(cfg.run.seed)  # the same initial dense weights on every rank, for any number of ranks
    model = GenerativeRecommender(cfg.model, dataset.num_items, device=ctx.device, table_device=torch.device("meta"))
    dmp, plan = shard_model(model, ctx, cfg.sharding, cfg.optim)
    optimizer, scheduler = make_optimizer(dmp, cfg.optim)
    torch.manual_seed(cfg.run.seed + 1000 + ctx.rank)  # dropout differs per rank
    if ctx.is_main:
        log.info("sharding plan:\n%s", describe_plan(plan))
        log.info("embedding optimizer: %s; dense optimizer: AdamW%s", sparse_optimizer_for(
            cfg.optim.sparse_optimizer, ctx.device).name, cfg.optim.betas)
        (run_dir / "plan.txt").write_text(str(plan) + "\n")
    progress = checkpoint.Progress()
    latest = checkpoint.latest(run_dir / "checkpoints")
    if cfg.run.resume and latest is not None:
        progress = checkpoint.load(latest, dmp, optimizer, trust=cfg.run.trust_checkpoints)
        scheduler.last_epoch = progress.global_step
        log.info("resumed from %s (epoch %d, step %d)", latest, progress.epoch, progress.step_in_epoch)
    elif cfg.run.resume:
        log.warning("--resume: no checkpoint under %s, starting fresh", run_dir / "checkpoints")
    if ctx.is_main:
        _rewind_logs(run_dir, progress)

    return Trainer(cfg, ctx, run_dir, dataset, dmp, optimizer, scheduler, progress)


def global_mean_loss(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Rescales each rank's mean loss so that N ranks take exactly the step one process would take on
    the whole global batch, and logs the global batch's loss.

    DDP (dense weights) and TorchRec's all-to-all backward (embeddings) both average the ranks'
    gradients. The average of ``world * local sum / global count`` over the ranks is the global mean;
    a plain per-rank mean would weigh a position of a rank with short histories more than one of a rank
    with long ones.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss, stats
    count = stats["num_labels"]
    totals = torch.stack([count, (loss * count).detach()]).float()
    dist.all_reduce(totals)  # [global count, global loss sum]
    total = totals[0].clamp(min=1)
    scaled = loss * (count * dist.get_world_size() / total)
    return scaled, {**stats, "loss": totals[1] / total, "num_labels": totals[0]}


def _rewind_logs(run_dir: Path, progress: checkpoint.Progress) -> None:
    """Drops what the logs hold past ``progress`` (a killed run logged steps and at most one epoch that its
    last checkpoint does not have; the resumed run computes and logs them again), and re-derives the
    ``best`` marker from it."""
    for name, keep in (("steps.jsonl", lambda r: r["step"] <= progress.global_step),
                       ("metrics.jsonl", lambda r: r["epoch"] < progress.epoch)):
        path = run_dir / name
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if _complete(line) and keep(json.loads(line))]
            if len(kept) != len(lines):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
    checkpoint.write_best_marker(run_dir / "checkpoints", progress)


def _complete(line: str) -> bool:
    """False for a line cut off by a kill in the middle of its write."""
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def fit(t: Trainer) -> None:
    cfg, p = t.cfg, t.progress
    writer = _tensorboard(t)
    while p.epoch < cfg.run.epochs:
        epoch = p.epoch
        stats = t.train_epoch(epoch)
        if not stats.pop("finished"):
            t.save_checkpoint()  # stopped mid-epoch (run.max_steps): --resume continues from here
            break
        record = {"epoch": epoch, "global_step": p.global_step, **stats}
        last = epoch + 1 == cfg.run.epochs or t.out_of_steps()
        if (epoch + 1) % cfg.run.eval_every == 0 or last:
            valid = t.evaluate(Split.VALID).metrics
            record.update({f"valid/{k}": v for k, v in valid.items()})
            if valid[SELECT_METRIC] > p.best_metric:
                p.best_metric, p.best_epoch = valid[SELECT_METRIC], epoch
                record["best"] = True
        p.epoch, p.step_in_epoch = epoch + 1, 0
        if record.get("best"):
            p.best_step = p.global_step  # the checkpoint saved next
        if t.ctx.is_main:  # logged before the checkpoint commits: a resume from an older one drops it
            _log_epoch(record, t.run_dir / "metrics.jsonl", writer)
        t.save_checkpoint()
        if t.out_of_steps():
            break
    if writer is not None:
        writer.close()
    finish(t)


def finish(t: Trainer) -> None:
    """Evaluates the best epoch's weights on the test target; writes predictions and the export."""
    # Every rank knows the best step from its own progress: no rank reads a file that another is writing.
    if t.progress.best_name is not None:
        best = t.run_dir / "checkpoints" / t.progress.best_name
        if not best.exists():
            raise FileNotFoundError(f"the best checkpoint {best} is gone; evaluate another with `make eval`")
        t.load_checkpoint(best, weights_only=True)
    result = t.evaluate(Split.TEST, with_topk=t.cfg.run.topk)
    if t.ctx.is_main:
        summary = {"best_epoch": t.progress.best_epoch, "valid_" + SELECT_METRIC: t.progress.best_metric,
                   "exclude_seen": t.cfg.data.exclude_seen.value,
                   **{f"test/{k}": v for k, v in result.metrics.items()},
                   **{f"test/window/{k}": v for k, v in result.window_metrics.items()}}
        (t.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("test: %s", "  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    if t.cfg.run.topk:
        write_predictions(result, t.dataset, t.run_dir / "predictions.parquet")
    export_run(t.net, t.cfg, t.dataset, t.run_dir / "export", t.ctx, metrics=result.metrics)
    if t.ctx.is_main:
        log.info("run directory: %s", t.run_dir)


def _log_epoch(record: dict, path: Path, writer) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    shown = {k: v for k, v in record.items() if k in ("train_loss", "valid/hr@10", "valid/ndcg@10", "valid/mrr")}
    tqdm.write(f"epoch {record['epoch']:3d}  step {record['global_step']:6d}  "
               + "  ".join(f"{k}={v:.4f}" for k, v in shown.items())
               + f"  ({record['epoch_time_s']:.1f}s){'  *best' if record.get('best') else ''}")
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                writer.add_scalar(k, v, record["global_step"])
        writer.flush()


def _tensorboard(t: Trainer):
    if not (t.ctx.is_main and t.cfg.run.tensorboard):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(t.run_dir / "tensorboard"))


def resolve_run_dir(cfg: TrainConfig, config_path: str | None, ctx: DistContext) -> Path:
    """runs/<name>/ with the resolved config; runs/latest points at it."""
    name = cfg.run.name
    if not name:
        stem = Path(config_path).stem if config_path else "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        obj = [f"{stem}-{stamp}"]
        dist.broadcast_object_list(obj, src=0)  # one name for all ranks, even across a second boundary
        name = obj[0]
    cfg.run.name = name  # config.yaml records the name the run got, so `--resume run.name=...` finds it
    run_dir = Path(cfg.run.out_dir) / name
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        link = Path(cfg.run.out_dir) / "latest"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
    dist.barrier()
    return run_dir


def prepare_command(args: argparse.Namespace) -> str:
    """The command that prepares the dataset of this run's config (what `make train` runs first)."""
    overrides = "".join(f" {shlex.quote(o)}" for o in args.overrides if o.startswith("data."))
    config = shlex.quote(args.config)
    return f"python -m data.prepare --config {config}{overrides}  (or: make data CONFIG={config})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-1m/hstu.yaml")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run named by run.name from its newest checkpoint")
    ap.add_argument("--verbose", action="store_true",
                    help="also the libraries' INFO logs and known-harmless warnings (training/logs.py)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.epochs=5 optim.lr=2e-3")
    return ap.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
