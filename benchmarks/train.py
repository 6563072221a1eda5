"""`make bench-train` / `make bench-scale`: training throughput, variants side by side in one run.

    python -m benchmarks.train [--suite ml-1m|scale|memory] [--nproc N] [--steps 30] [--variants a,b] [key=value ...]

Suites (a config and its default variants):
  ml-1m   configs/ml-1m/hstu.yaml: pipelined, plain (+ pipelined-ref, pipelined-ckpt on CUDA)
  scale   configs/scale/hstu-10m.yaml (10M items, d=128, histories up to 512, Zipf): pipelined, plain
  memory  configs/scale/long-history.yaml (histories of 4,200-8,000 events through a 4,096 window):
          pipelined, pipelined-ckpt: peak device memory with and without activation checkpointing

Variants (each a fresh run built by ``training.train.build``, same data, same config):
  pipelined        TrainPipelineSparseDist (copy + embedding input_dist of batch i+1 overlap batch i)
  plain            the same trainer without the pipeline: to(device) -> forward -> backward -> step
  pipelined-ref    pipelined, attention through the PyTorch reference instead of the Triton kernel
  pipelined-ckpt   pipelined, activation checkpointing per block

``--nproc N`` runs the same command on N processes (torchrun; one GPU each on CUDA): ``data.batch_size``
is the global batch, so the rows compare like for like across N. Overrides go to the config, e.g.
``sharding.kernels={item_table: fused_uvm_caching} sharding.device_memory_gb=12`` (the table in host
memory with a device cache, and the process held to 12 GB of device memory).

Prints one row per variant (step time, samples/s, an epoch estimate, peak device memory per rank) and
the command that reproduces the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from data.splits import Split
from training.config import load_config
from training.distributed import DistContext, cleanup, init_process_group
from training.train import Trainer, build

SUITES = {
    "ml-1m": ("configs/ml-1m/hstu.yaml", ["pipelined", "plain", "pipelined-ref", "pipelined-ckpt"]),
    "scale": ("configs/scale/hstu-10m.yaml", ["pipelined", "plain"]),
    "memory": ("configs/scale/long-history.yaml", ["pipelined", "pipelined-ckpt"]),
}
COMMAND_ENV = "GENREC_BENCH_COMMAND"
"""The command line as the user typed it, for the table's last line (torchrun's children get less)."""
VARIANTS = {
    "pipelined": [],
    "plain": [],
    "pipelined-ref": ["model.attention_impl=pytorch"],
    "pipelined-ckpt": ["model.activation_checkpointing=true"],
}


def endless_batches(trainer: Trainer) -> Iterator:
    """This rank's training batches, epochs back to back, built on the CPU as in training."""
    for epoch in itertools.count():
        yield from trainer.loader(Split.TRAIN, epoch)


def stepper(trainer: Trainer, variant: str) -> Callable[[], dict]:
    data = endless_batches(trainer)
    if variant != "plain":
        return lambda: trainer.pipeline.progress(data)

    def plain_step() -> dict:
        batch = next(data).to(trainer.ctx.device, non_blocking=True)
        trainer.optimizer.zero_grad()
        loss, stats = trainer.forward(batch)
        loss.backward()
        trainer.optimizer.step()
        return stats

    return plain_step


def run_variant(variant: str, args: argparse.Namespace, ctx: DistContext, out_dir: str) -> dict:
    overrides = [*args.overrides, *VARIANTS[variant], f"run.out_dir={out_dir}", f"run.name=bench-{variant}",
                 "run.tensorboard=false"]
    cfg = load_config(args.config, overrides)
    trainer = build(cfg, ctx, args.config)
    steps_per_epoch = len(trainer.loader(Split.TRAIN, 0))
    step = stepper(trainer, variant)
    cuda = ctx.device.type == "cuda"
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = step()
        float(stats["loss"])  # waits for the step, as the training loop's logging does
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peaks = _gather_floats(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), ctx)
    del step, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    median = statistics.median(times)
    return {"variant": variant, "median_ms": 1e3 * median, "mean_ms": 1e3 * statistics.mean(times),
            "samples_s": cfg.data.batch_size / median, "epoch_s": statistics.mean(times) * steps_per_epoch,
            "peaks": peaks, "batch": cfg.data.batch_size, "cfg": cfg}


def _gather_floats(value: float, ctx: DistContext) -> list[float]:
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def relaunch(module: str, nproc: int, argv: list[str]) -> int:
    """The same command (``python -m module argv``) under torchrun with ``nproc`` processes; the table's
    reproduce line reads the command as typed from ``COMMAND_ENV``."""
    rest = [a for i, a in enumerate(argv) if not a.startswith("--nproc") and not (i and argv[i - 1] == "--nproc")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *rest]
    return subprocess.call(cmd, env={**os.environ, COMMAND_ENV: " ".join(argv)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="ml-1m")
    ap.add_argument("--config", help="default: the suite's")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to run on")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", type=lambda text: text.split(","), default=None,
                    help=f"comma-separated, of {','.join(VARIANTS)} (default: the suite's)")
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args(argv)
    unknown = set(args.variants or []) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch("benchmarks.train", args.nproc, argv)
    config, default_variants = SUITES[args.suite]
    args.config = args.config or config
    cfg = load_config(args.config, args.overrides)
    ctx = init_process_group(cfg.run.device, cfg.run.collective_timeout_s)
    cuda = ctx.device.type == "cuda"
    variants = args.variants or (default_variants if cuda else ["pipelined", "plain"])
    out_dir = [tempfile.mkdtemp(prefix="bench-train-") if ctx.is_main else ""]
    dist.broadcast_object_list(out_dir, src=0)  # one run directory for all ranks, as training has
    rows = [run_variant(v, args, ctx, out_dir[0]) for v in variants]
    if ctx.is_main:
        shutil.rmtree(out_dir[0], ignore_errors=True)
        print(table(rows, args, ctx, argv))
    cleanup()
    return 0


def table(rows: list[dict], args: argparse.Namespace, ctx: DistContext, argv: list[str]) -> str:
    cfg = rows[0]["cfg"]
    cuda = ctx.device.type == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    m = cfg.model
    lines = [
        f"\nbench-train  {datetime.date.today()}  {ctx.world_size} x {card}  torch {torch.__version__}  "
        f"{args.config} {' '.join(args.overrides)}",
        f"global batch {cfg.data.batch_size}, length {m.max_seq_len}, d {m.embedding_dim}, {m.num_blocks} blocks x "
        f"{m.num_heads} heads, {cfg.data.num_negatives} negatives; {args.steps} timed steps after {args.warmup}",
        f"{'variant':<16} {'median ms':>10} {'mean ms':>9} {'samples/s':>10} {'epoch s':>9}  peak GiB per rank",
    ]
    for r in rows:
        peaks = " ".join(f"{p:.2f}" for p in r["peaks"])
        lines.append(f"{r['variant']:<16} {r['median_ms']:>10.1f} {r['mean_ms']:>9.1f} {r['samples_s']:>10.0f} "
                     f"{r['epoch_s']:>9.1f}  {peaks}")
    lines.append("reproduce: python -m benchmarks.train " + os.environ.get(COMMAND_ENV, " ".join(argv)))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
