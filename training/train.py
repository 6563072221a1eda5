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
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from data.loader import make_dataloader
from data.prepare import PreparedDataset, prepare
from data.splits import Split
from models.recommender import GenerativeRecommender
from training import checkpoint
from training.config import TrainConfig, load_config, save_config
from training.distributed import (
    DistContext,
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


@dataclass
class Trainer:
    """The state of one training run on one rank."""

    cfg: TrainConfig
    ctx: DistContext
    run_dir: Path
    dataset: PreparedDataset
    model: torch.nn.Module  # DistributedModelParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pipeline: TrainPipelineSparseDist
    progress: checkpoint.Progress

    @property
    def net(self) -> GenerativeRecommender:
        return self.model.module  # type: ignore[return-value]

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
        step_log = (self.run_dir / "steps.jsonl").open("a") if self.ctx.is_main else None
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
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            max_len=cfg.max_len,
            num_negatives=cfg.num_negatives if train else 0,
            shuffle=train,
            seed=self.cfg.run.seed,
            epoch=epoch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=cfg.num_workers,
            start_batch=start_batch,
            exclude_validation_from_train=cfg.exclude_validation_from_train,
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


# --- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.run.resume = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    ctx = init_process_group(cfg.run.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = build(cfg, ctx, args.config)
        fit(trainer)
    finally:
        # Release everything that holds process-group resources before destroying the group.
        del trainer
        gc.collect()
        cleanup()
    return 0


def build(cfg: TrainConfig, ctx: DistContext, config_path: str | None) -> Trainer:
    torch.manual_seed(cfg.run.seed + ctx.rank)
    dataset = prepare(cfg.data.dataset, root=cfg.data.root) if ctx.is_main else None
    dist.barrier()  # rank 0 prepares (and caches) the data once; the others then read the cache
    if dataset is None:
        dataset = prepare(cfg.data.dataset, root=cfg.data.root)
    run_dir = resolve_run_dir(cfg, config_path, ctx)
    torch.manual_seed(cfg.run.seed)  # the same initial dense weights on every rank
    model = GenerativeRecommender(cfg.model, dataset.num_items, device=torch.device("meta"))
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
        progress = checkpoint.load(latest, dmp, optimizer)
        scheduler.last_epoch = progress.global_step
        log.info("resumed from %s (epoch %d, step %d)", latest, progress.epoch, progress.step_in_epoch)
    elif cfg.run.resume:
        log.warning("--resume: no checkpoint under %s, starting fresh", run_dir / "checkpoints")

    autocast = ctx.device.type == "cuda" and cfg.run.bf16

    def forward(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return dmp(batch)

    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device, custom_model_fwd=forward)
    return Trainer(cfg, ctx, run_dir, dataset, dmp, optimizer, scheduler, pipeline, progress)


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
        saved = t.save_checkpoint()
        if t.ctx.is_main:
            if record.get("best"):
                checkpoint.mark_best(t.run_dir / "checkpoints", saved)
            _log_epoch(record, t.run_dir / "metrics.jsonl", writer)
        if t.out_of_steps():
            break
    if writer is not None:
        writer.close()
    finish(t)


def finish(t: Trainer) -> None:
    """Evaluates the best epoch's weights on the test target; writes predictions and the export."""
    best = checkpoint.best_checkpoint(t.run_dir / "checkpoints")
    if best is not None:
        if not best.exists():
            raise FileNotFoundError(f"the best checkpoint {best} is gone; evaluate another with `make eval`")
        checkpoint.load(best, t.model, None)
    result = t.evaluate(Split.TEST, with_topk=t.cfg.run.topk)
    if t.ctx.is_main:
        summary = {"best_epoch": t.progress.best_epoch, "valid_" + SELECT_METRIC: t.progress.best_metric,
                   **{f"test/{k}": v for k, v in result.metrics.items()}}
        (t.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_predictions(result, t.dataset, t.run_dir / "predictions.parquet")
        log.info("test: %s", "  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-1m/hstu.yaml")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run named by run.name from its newest checkpoint")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.epochs=5 optim.lr=2e-3")
    return ap.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
