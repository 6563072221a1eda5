"""`make bench-eval`: ranking a batch of users against a large catalogue, in item blocks
(``models.metrics.rank_items``, what evaluation runs) beside the whole score matrix
(``target_ranks`` over ``users @ table.T``, what it ran before), each in a process of its own.

    python -m benchmarks.evaluate [--items 10000000] [--dim 64] [--users 128] [--seen 200]
                                  [--variants blocks,whole] [--device cpu]

Random unit vectors stand in for the model (the work does not depend on their values): a [users, dim]
batch, a [items + 1, dim] table, one target and ``--seen`` seen items per user, top 200 kept. Reports
each variant's wall time for the batch and its process's peak resident memory (``ru_maxrss``, which
includes the table, whose size is printed apart; on a GPU also the peak device memory). The two
variants' ranks are compared: they may differ where another item's score ties the target's to float32
precision, since the blocks take the target's score from its row's dot product.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from models.metrics import rank_items, target_ranks

TOP_K = 200


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(args.items + 1, args.dim, generator=gen)
    table /= table.norm(dim=1, keepdim=True)  # in place: the inputs cost the table once, not twice
    users = torch.nn.functional.normalize(torch.randn(args.users, args.dim, generator=gen), dim=1)
    targets = torch.randint(1, args.items + 1, (args.users,), generator=gen)
    seen = torch.randint(1, args.items + 1, (args.users * args.seen,), generator=gen)
    lengths = torch.full((args.users,), args.seen)
    device = torch.device(args.device)
    return tuple(t.to(device) for t in (table, users, targets, seen, lengths))


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: returns its seconds, ranks' checksum and peak device memory."""
    table, users, targets, seen, lengths = inputs(args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        if args.run_variant == "blocks":
            ranks = rank_items(users, table, targets, (seen, lengths), k=TOP_K).ranks
        else:
            scores = users @ table.T
            ranks = target_ranks(scores, targets, seen, lengths)
            scores[:, 0] = float("-inf")
            rows = torch.repeat_interleave(torch.arange(args.users, device=scores.device), lengths)
            scores[rows, seen] = float("-inf")
            scores.topk(TOP_K, dim=1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_device = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    return {"seconds": seconds, "ranks": ranks.cpu().tolist(), "peak_device_gib": peak_device}


def measure(args: argparse.Namespace, variant: str) -> dict:
    """Runs ``variant`` in a subprocess; adds its peak RSS (GiB) or the reason it failed."""
    command = [sys.executable, "-m", "benchmarks.evaluate", "--run-variant", variant, "--items", str(args.items),
               "--dim", str(args.dim), "--users", str(args.users), "--seen", str(args.seen), "--device", args.device]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    peak = usage.ru_maxrss * 1024 / 2**30
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"variant": variant, "error": f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}",
                "peak_rss_gib": peak}
    return {"variant": variant, **json.loads(out), "peak_rss_gib": peak}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--users", type=int, default=128, help="users in the batch")
    ap.add_argument("--seen", type=int, default=200, help="seen items per user, removed from the ranking")
    ap.add_argument("--variants", default="blocks,whole")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--run-variant", choices=["blocks", "whole"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_variant:
        print(json.dumps(run_variant(args)))
        return
    table_gib = (args.items + 1) * args.dim * 4 / 2**30
    rows = [measure(args, v) for v in args.variants.split(",")]
    print(f"rank {args.users} users against {args.items:,} items, d={args.dim}, {args.seen} seen each, top {TOP_K} "
          f"({platform.node()}, {os.cpu_count()} CPUs, {args.device}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}); the table alone is {table_gib:.2f} GiB")
    print("| variant | seconds | peak RSS GiB | peak device GiB | note |\n|---|--:|--:|--:|---|")
    done = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | {r['peak_rss_gib']:.2f} | | {r['error']} |")
        else:
            print(f"| {r['variant']} | {r['seconds']:.2f} | {r['peak_rss_gib']:.2f} | {r['peak_device_gib']:.2f} | |")
    if len(done) == 2:
        pairs = list(zip(done[0]["ranks"], done[1]["ranks"], strict=True))
        same = sum(a == b for a, b in pairs)
        worst = max(abs(a - b) for a, b in pairs)
        hits = {k: [sum(r <= k for r in rank) for rank in zip(*pairs, strict=True)] for k in (10, 200)}
        print(f"\nranks equal for {same} of {args.users} users, at most {worst} apart (a score that ties the "
              f"target's to float32 precision, rounded differently); hits@10 {hits[10]}, hits@200 {hits[200]}")
    print("\nreproduce: python -m benchmarks.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
