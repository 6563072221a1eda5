"""`make bench-train`: training step time, variants side by side in one run.

    python -m benchmarks.train [--config configs/ml-1m/hstu.yaml] [--steps 30] [--variants ...]

Variants (each a fresh model, same data, same config):
  pipelined        TrainPipelineSparseDist (copy + embedding input_dist of batch i+1 overlap batch i)
  plain            the same model, no pipeline: to(device) -> forward -> backward -> step, in order
  pipelined-ref    pipelined, attention through the PyTorch reference instead of the Triton kernel
  pipelined-ckpt   pipelined, activation checkpointing per block

Prints one row per variant (median and mean step time, an ML-1M epoch estimate, peak GPU memory)
and the command that reproduces the table. Runs as one process (torchrun not needed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Iterator

import torch

from data.loader import make_dataloader
from data.prepare import prepare
from data.splits import Split
from models.recommender import GenerativeRecommender
from training.config import TrainConfig, load_config
from training.distributed import cleanup, init_process_group, make_optimizer, shard_model

VARIANTS = {
    "pipelined": {},
    "plain": {"pipeline": False},
    "pipelined-ref": {"attention_impl": "pytorch"},
    "pipelined-ckpt": {"activation_checkpointing": True},
}


def batches(cfg: TrainConfig, dataset, device_kind: str) -> Iterator:
    """Endless training batches (epochs back to back), built on the CPU as in training."""
    for epoch in itertools.count():
        yield from make_dataloader(
            dataset, Split.TRAIN, batch_size=cfg.data.batch_size, max_len=cfg.data.max_len,
            num_negatives=cfg.data.num_negatives, seed=cfg.run.seed, epoch=epoch,
            num_workers=cfg.data.num_workers,
        )


def run_variant(name: str, cfg: TrainConfig, dataset, ctx, steps: int, warmup: int) -> dict:
    options = VARIANTS[name]
    model_cfg = cfg.model.replace(
        attention_impl=options.get("attention_impl", cfg.model.attention_impl),
        activation_checkpointing=options.get("activation_checkpointing", cfg.model.activation_checkpointing),
    )
    torch.manual_seed(cfg.run.seed)
    model = GenerativeRecommender(model_cfg, dataset.num_items, device=torch.device("meta"))
    dmp, _ = shard_model(model, ctx, cfg.sharding, cfg.optim)
    optimizer, _ = make_optimizer(dmp, cfg.optim)
    cuda = ctx.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.run.bf16 else contextlib.nullcontext()

    def forward(batch):
        with autocast:
            return dmp(batch)

    data = batches(cfg, dataset, ctx.device.type)
    if options.get("pipeline", True):
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device, custom_model_fwd=forward)
        step = lambda: pipeline.progress(data)  # noqa: E731
    else:
        pipeline = None

        def step():
            batch = next(data).to(ctx.device, non_blocking=True)
            optimizer.zero_grad()
            loss, stats = forward(batch)
            loss.backward()
            optimizer.step()
            return stats

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = step()
        float(stats["loss"])  # waits for the step, as the training loop's logging does
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if cuda:
        torch.cuda.empty_cache()
    return {"variant": name, "median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.mean(times),
            "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-1m/hstu.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ctx = init_process_group(cfg.run.device)
    cuda = ctx.device.type == "cuda"
    variants = args.variants or (list(VARIANTS) if cuda else ["pipelined", "plain"])
    dataset = prepare(cfg.data.dataset, root=cfg.data.root)
    steps_per_epoch = len(make_dataloader(dataset, Split.TRAIN, batch_size=cfg.data.batch_size,
                                          max_len=cfg.data.max_len, num_negatives=cfg.data.num_negatives))
    rows = []
    for v in variants:
        rows.append(run_variant(v, cfg, dataset, ctx, args.steps, args.warmup))
        gc.collect()
    card = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"\nbench-train  {datetime.date.today()}  {card}  torch {torch.__version__}  "
          f"config {args.config} {' '.join(args.overrides)}")
    print(f"batch {cfg.data.batch_size}, length {cfg.data.max_len}, d {cfg.model.embedding_dim}, "
          f"{cfg.model.num_blocks} blocks x {cfg.model.num_heads} heads, {args.steps} timed steps after "
          f"{args.warmup} warm-up; epoch = {steps_per_epoch} steps")
    print(f"{'variant':<16} {'median ms':>10} {'mean ms':>10} {'epoch s':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['variant']:<16} {r['median_ms']:>10.1f} {r['mean_ms']:>10.1f} "
              f"{r['mean_ms'] * steps_per_epoch / 1e3:>9.1f} {r['peak_gib']:>9.2f}")
    print("reproduce: python -m benchmarks.train " + " ".join(sys.argv[1:] if argv is None else argv))
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
