"""`make bench-epoch`: one config's first whole epoch and one validation pass, timed: the scale check of
issue 14 (100M events, 10M users, 10M items) after `make bench-data` measured its preparation.

    python -m benchmarks.epoch [--config configs/scale/events-100m.yaml] [--nproc N] [key=value ...]

The dataset must be prepared (``python -m data.prepare --config CONFIG``; `make bench-epoch` writes the
synthetic event file and prepares it first). The trainer is ``training.train.build``'s, the epoch is
``Trainer.train_epoch`` and the validation pass ``Trainer.evaluate(Split.VALID)``: exactly what
``make train`` runs for its first epoch (the test pass, which ranks every user, and the export are not
timed here). Prints one row: steps, epoch time, users and events a second, validation users and time,
peak device memory and peak resident host memory per rank, and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.train import COMMAND_ENV, relaunch
from data.splits import Split
from training.config import load_config
from training.distributed import cleanup, init_process_group
from training.train import build

DEFAULT_CONFIG = "configs/scale/events-100m.yaml"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _gather(value: float) -> list[float]:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to run on")
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args(argv)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch("benchmarks.epoch", args.nproc, argv)
    cfg = load_config(args.config, args.overrides)
    ctx = init_process_group(cfg.run.device, cfg.run.collective_timeout_s)
    cuda = ctx.device.type == "cuda"
    out_dir = [tempfile.mkdtemp(prefix="bench-epoch-") if ctx.is_main else ""]
    dist.broadcast_object_list(out_dir, src=0)
    cfg = load_config(args.config, [*args.overrides, f"run.out_dir={out_dir[0]}", "run.name=bench-epoch",
                                    "run.tensorboard=false"])
    t0 = time.perf_counter()
    trainer = build(cfg, ctx, args.config)
    build_s = time.perf_counter() - t0
    d = trainer.dataset
    stats = trainer.train_epoch(0)
    _sync(cuda)
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    t0 = time.perf_counter()
    result = trainer.evaluate(Split.VALID)
    _sync(cuda)
    valid_s = time.perf_counter() - t0
    device_peaks = _gather(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
    train_peaks = _gather(train_peak)
    host_peaks = _gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB -> GiB
    if ctx.is_main:
        card = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
        m = cfg.model
        users = cfg.data.valid_users or d.num_users
        lines = [
            f"\nbench-epoch  {datetime.date.today()}  {ctx.world_size} x {card}  torch {torch.__version__}  "
            f"{args.config} {' '.join(args.overrides)}",
            f"{d.num_users:,} users, {d.manifest.counts.interactions:,} events, {d.num_items:,} items; "
            f"global batch {cfg.data.batch_size}, length "
            f"{m.max_seq_len}, d {m.embedding_dim}, {m.num_blocks} blocks, {cfg.data.num_negatives} negatives; "
            f"built (dataset opened, model sharded) in {build_s:.1f} s",
            "| steps | epoch s | users/s | train loss | valid users | valid s | valid HR@10 | peak device GiB "
            "(train, +valid) per rank | peak host RSS GiB per rank |",
            "|--:|--:|--:|--:|--:|--:|--:|---|---|",
            f"| {stats['train_steps']:,} | {stats['epoch_time_s']:.0f} | "
            f"{stats['train_steps'] * cfg.data.batch_size / stats['epoch_time_s']:,.0f} | {stats['train_loss']:.3f} | "
            f"{users:,} | {valid_s:.1f} | {result.metrics['hr@10']:.4f} | "
            + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(train_peaks, device_peaks, strict=True)) + " | "
            + ", ".join(f"{h:.1f}" for h in host_peaks) + " |",
            "reproduce: python -m benchmarks.epoch " + os.environ.get(COMMAND_ENV, " ".join(argv)),
        ]
        print("\n".join(lines), flush=True)
        shutil.rmtree(out_dir[0], ignore_errors=True)
    del trainer
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
