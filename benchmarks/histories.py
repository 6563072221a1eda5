"""`make bench-histories`: the export's history store (``serving.histories``) at 10M users.

    python -m benchmarks.histories [--users 10000000] [--events-per-user 10] [--lookups 20000] [--dir DIR]

Writes a synthetic ``UserHistories`` (ids "u<n>" in random order, log-normal lengths, dense items) with
``HistoryStore.write``, then, in a fresh process, opens it and looks up random users: the resident
memory that process needs (its peak, VmHWM) and the lookup latency. Prints a table and the
command that reproduces it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serving.histories import HistoryStore, UserHistories


def lookups(directory: str, count: int, users: int) -> dict:
    """In this process: open the store and look ``count`` random users up."""
    start = time.perf_counter()
    store = HistoryStore.open(directory)
    opened = time.perf_counter() - start
    rng = np.random.default_rng(1)
    keys = [f"u{u}" for u in rng.integers(0, users, count)]
    times = []
    for key in keys:
        t0 = time.perf_counter()
        found = store.get(key)
        times.append(time.perf_counter() - t0)
        assert found is not None
    return {"open_s": opened, "p50_us": 1e6 * float(np.median(times)), "p99_us": 1e6 * float(np.quantile(times, 0.99)),
            "peak_rss_gib": _peak_rss_gib()}


def _peak_rss_gib() -> float:
    """This process's peak resident memory since its exec (VmHWM; ``ru_maxrss`` would carry the
    parent's peak across the fork and exec of ``subprocess``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.histories", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000_000)
    ap.add_argument("--events-per-user", type=float, default=10.0)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--dir", default="/tmp/genrec-bench-histories")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(lookups(args.dir, args.lookups, args.users)))
        return
    rng = np.random.default_rng(0)
    mu = np.log(args.events_per_user) - 0.5  # log-normal, sigma 1: mean events_per_user
    lengths = np.maximum(1, np.rint(rng.lognormal(mu, 1.0, args.users))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    histories = UserHistories(np.char.add("u", rng.permutation(args.users).astype(str)), offsets,
                              rng.integers(1, 10_000_000, offsets[-1], dtype=np.int64),
                              rng.integers(1_700_000_000, 1_800_000_000, offsets[-1], dtype=np.int64))
    shutil.rmtree(args.dir, ignore_errors=True)
    start = time.perf_counter()
    HistoryStore.write(args.dir, histories)
    write_s = time.perf_counter() - start
    writer_peak = _peak_rss_gib()
    disk = sum(p.stat().st_size for p in Path(args.dir).iterdir()) / 1e9
    del histories
    out = subprocess.run([sys.executable, "-m", "benchmarks.histories", "--child", "--dir", args.dir,
                          "--users", str(args.users), "--lookups", str(args.lookups)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    print(f"history store ({platform.node()}, {os.cpu_count()} CPUs, {datetime.date.today()}): {args.users:,} users, "
          f"{offsets[-1]:,} events")
    print("| write s | writer peak RSS GiB | on disk GB | open s | lookup p50 us | lookup p99 us "
          "| server peak RSS GiB |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    print(f"| {write_s:.1f} | {writer_peak:.2f} | {disk:.2f} | {r['open_s']:.3f} | {r['p50_us']:.1f} | "
          f"{r['p99_us']:.1f} | {r['peak_rss_gib']:.2f} |")
    print("\nreproduce: python -m benchmarks.histories " + " ".join(argv if argv is not None else sys.argv[1:]))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
