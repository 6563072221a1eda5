"""`make bench-catalogue`: retrieval over large synthetic catalogues through ``serving.index``, one
process per (catalogue, index kind).

    python -m benchmarks.catalogue [--items 1000000,10000000] [--kinds exact,ivf,hnsw] [--dim 64]
                                   [--device cpu] [--time-cap-s 600] [--index-nprobe N ...]

For each catalogue size and index kind: build time, the index's memory beside the item vectors,
recall@100 against the exact answer, the latency (p50 / p99) and throughput of ``ItemIndex.search``
for batches of 1 and of 32 users (the dynamic batcher scores a batch of users at once), and the
process's peak resident memory (``ru_maxrss``, which includes the item vectors themselves).

The catalogue has cluster structure: items scattered around a few thousand centres of unequal size,
L2-normalised as the model's are, and users drawn near a centre too. Uniform random vectors would be
a worst case no trained model produces (every item nearly orthogonal to every user, the top 100 set
apart from the rest by noise): ``--spread`` widens the clusters towards it. Every user excludes
``--exclude`` random items, as a served request excludes its history.

HNSW's build is the slow one on a small CPU: a build whose estimate (from a smaller catalogue of the
same run, which scales as n log n) exceeds ``--time-cap-s`` is skipped and says so in the table, and
one that runs over twice the cap is stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serving.index import IndexConfig, IndexKind, ItemIndex, build_index

RECALL_AT = 100
BATCHES = (1, 32)
CHUNK = 1 << 18  # rows generated at a time: small, so that the peak RSS is the index's, not the generator's


@dataclass(frozen=True)
class Synthetic:
    """A clustered catalogue: ``centres`` directions, cluster sizes ~ rank^-``skew``, items and users at
    ``spread`` (the norm of their Gaussian offset, before normalising) around their centre."""

    num_items: int
    dim: int = 64
    centres: int = 3000
    spread: float = 1.0
    skew: float = 0.5
    seed: int = 0

    def _centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        centres = torch.nn.functional.normalize(torch.randn(self.centres, self.dim, generator=gen), dim=1)
        weights = torch.arange(1, self.centres + 1, dtype=torch.float64) ** -self.skew
        return centres, weights / weights.sum()

    def _near(self, n: int, gen: torch.Generator) -> torch.Tensor:
        centres, weights = self._centres()
        which = torch.multinomial(weights, n, replacement=True, generator=gen)
        noise = torch.randn(n, self.dim, generator=gen) * (self.spread / math.sqrt(self.dim))
        return torch.nn.functional.normalize(centres[which] + noise, dim=1)

    def item_vectors(self) -> torch.Tensor:
        """[num_items + 1, dim] float32, L2-normalised; row 0 (padding) zero. Written a chunk at a time,
        so the catalogue costs its own size and one chunk."""
        out = torch.zeros(self.num_items + 1, self.dim)
        gen = torch.Generator().manual_seed(self.seed + 1)
        for start in range(1, self.num_items + 1, CHUNK):
            end = min(start + CHUNK, self.num_items + 1)
            out[start:end] = self._near(end - start, gen)
        return out

    def users(self, n: int, seed: int = 2) -> torch.Tensor:
        """[n, dim] L2-normalised users, each near a centre drawn by cluster size."""
        return self._near(n, torch.Generator().manual_seed(self.seed + seed))

    def excludes(self, n: int, per_user: int, seed: int = 3) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + seed)
        return [np.unique(rng.integers(1, self.num_items + 1, size=per_user)) for _ in range(n)]


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean over users of |found ∩ truth| / |truth|."""
    return float(np.mean([len(np.intersect1d(f, t)) / max(len(t), 1) for f, t in zip(found, truth, strict=True)]))


def timed(index: ItemIndex, users: torch.Tensor, excludes: list[np.ndarray], batch: int, budget_s: float,
          device: torch.device) -> dict:
    """Latency of ``index.search`` on consecutive batches of ``batch`` users, until ``budget_s`` has
    passed (at least 5 batches, at most all the users): p50 / p99 ms per batch and users per second."""
    seconds: list[float] = []
    spent = 0.0
    for start in range(0, len(users) - batch + 1, batch):
        rows = users[start : start + batch]
        t = time.perf_counter()
        index.search(rows, [RECALL_AT] * batch, excludes[start : start + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        spent += seconds[-1]
        if spent > budget_s and len(seconds) >= 5:
            break
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "qps": batch * len(ms) / float(np.sum(seconds)), "batches": len(ms)}


def _sweep(values: str | None) -> list[int | None]:
    return [int(v) for v in values.split(",")] if values else [None]


def run_one(args: argparse.Namespace) -> dict:
    """One (catalogue, kind) in this process: build once, then for each value of the swept search
    knob (``--index-nprobe`` or ``--hnsw-ef-search``, comma-separated) recall against ``--truth``
    and the latencies. The exact run writes the truth file the others read."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    synthetic = Synthetic(args.run_items, args.dim, args.centres, args.spread, args.skew)
    vectors = synthetic.item_vectors().to(device)
    users = synthetic.users(args.queries).to(device)
    excludes = synthetic.excludes(args.queries, args.exclude)
    kind = IndexKind(args.run_kind)
    knobs: dict = {IndexKind.EXACT: {},
                   IndexKind.IVF: {"shortlist": args.index_shortlist, "nlist": args.index_nlist},
                   IndexKind.HNSW: {"shortlist": args.index_shortlist, "hnsw_m": args.hnsw_m,
                                    "hnsw_ef_construction": args.hnsw_ef_construction}}[kind]
    sweep = {IndexKind.EXACT: [None], IndexKind.IVF: _sweep(args.index_nprobe),
             IndexKind.HNSW: _sweep(args.hnsw_ef_search)}[kind]
    first = {"nprobe": sweep[0]} if kind is IndexKind.IVF else {"hnsw_ef_search": sweep[0]} if sweep[0] else {}
    index = build_index(vectors, IndexConfig(kind, **knobs, **(first if kind is not IndexKind.EXACT else {})),
                        threads=args.threads)
    truth_file = Path(args.truth)
    rows = []
    for value in sweep:
        if value is not None:
            index.set_search_knobs(**({"nprobe": value} if kind is IndexKind.IVF else {"hnsw_ef_search": value}))
        found = []
        for start in range(0, args.queries, 32):
            batch = users[start : start + 32]
            found += [items for items, _ in index.search(batch, [RECALL_AT] * len(batch), excludes[start : start + 32])]
        if kind is IndexKind.EXACT:
            np.save(truth_file, np.stack(found))
        row = {"knobs": _knobs(index.config), "recall": recall(found, list(np.load(truth_file)))}
        for size in BATCHES:
            row[f"batch{size}"] = timed(index, users, excludes, size, args.budget_s, device)
        rows.append(row)
    peak_device = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"build_s": index.build_seconds, "memory_bytes": index.memory_bytes, "rows": rows,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_device_gib": peak_device}


def _knobs(c: IndexConfig) -> str:
    shortlist = f"shortlist {c.shortlist}" if c.shortlist else "shortlist max(4k,256)"
    if c.kind is IndexKind.IVF:
        return f"nlist {c.nlist}, nprobe {c.nprobe}, {shortlist}"
    if c.kind is IndexKind.HNSW:
        return f"M {c.hnsw_m}, efSearch {c.hnsw_ef_search}, efConstruction {c.hnsw_ef_construction}, {shortlist}"
    return "whole catalogue"


PASSED = ("dim", "centres", "spread", "skew", "queries", "exclude", "device", "threads", "budget_s", "index_shortlist",
          "index_nlist", "index_nprobe", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction")


def measure(args: argparse.Namespace, items: int, kind: str, truth: Path, timeout_s: float) -> dict:
    """Runs one (catalogue, kind) in a subprocess; returns its result or why it has none."""
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in PASSED if getattr(args, k) is not None]
    command = [sys.executable, "-m", "benchmarks.catalogue", *passed, "--run-kind", kind, "--run-items", str(items),
               "--truth", str(truth)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"stopped after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return json.loads(out.strip().splitlines()[-1])


def estimate_build(done: dict[int, float], items: int) -> float | None:
    """A build's seconds at ``items`` from the largest smaller catalogue built (n log n), if any."""
    smaller = [n for n in done if n < items]
    if not smaller:
        return None
    n = max(smaller)
    return done[n] * items / n * math.log(items) / math.log(n)


def table(results: list[tuple[int, str, dict]]) -> str:
    lines = ["| items | index | knobs | build s | index MiB | recall@100 | batch 1 p50 / p99 ms | batch 1 QPS "
             "| batch 32 p50 / p99 ms | batch 32 users/s | peak RSS GiB |",
             "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for items, kind, r in results:
        if "error" in r:
            lines.append(f"| {items:,} | {kind} | {r['error']} | | | | | | | | |")
            continue
        for row in r["rows"]:
            b1, b32 = row["batch1"], row["batch32"]
            lines.append(f"| {items:,} | {kind} | {row['knobs']} | {r['build_s']:.1f} "
                         f"| {r['memory_bytes'] / 2**20:.0f} "
                         f"| {row['recall']:.4f} | {b1['p50_ms']:.2f} / {b1['p99_ms']:.2f} | {b1['qps']:.0f} "
                         f"| {b32['p50_ms']:.1f} / {b32['p99_ms']:.1f} | {b32['qps']:.0f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.catalogue", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="1000000,10000000", help="catalogue sizes, comma-separated")
    ap.add_argument("--kinds", default="exact,ivf,hnsw", help="index kinds; exact always runs (the reference)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--centres", type=int, default=3000, help="cluster centres of the catalogue")
    ap.add_argument("--spread", type=float, default=1.0, help="items' and users' Gaussian offset from their centre")
    ap.add_argument("--skew", type=float, default=0.5, help="cluster sizes ~ rank^-skew")
    ap.add_argument("--queries", type=int, default=640, help="users whose recall is measured")
    ap.add_argument("--exclude", type=int, default=50, help="random items each user excludes")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the item vectors live: the exact scoring and the re-scoring run there")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and FAISS threads (the server's --torch-threads; its default is 1)")
    ap.add_argument("--budget-s", type=float, default=15.0, help="seconds of latency samples per batch size")
    ap.add_argument("--time-cap-s", type=float, default=600.0,
                    help="skip a build estimated to take longer; stop a run at twice this plus 5 minutes")
    ap.add_argument("--index-shortlist", type=int)
    ap.add_argument("--index-nlist", type=int)
    ap.add_argument("--index-nprobe", help="comma-separated: one row each, one build")
    ap.add_argument("--hnsw-m", type=int)
    ap.add_argument("--hnsw-ef-search", help="comma-separated: one row each, one build")
    ap.add_argument("--hnsw-ef-construction", type=int)
    ap.add_argument("--run-kind", choices=[k.value for k in IndexKind], help=argparse.SUPPRESS)
    ap.add_argument("--run-items", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--truth", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_kind:
        print(json.dumps(run_one(args)))
        return
    kinds = ["exact", *(k for k in args.kinds.split(",") if k != "exact")]
    builds: dict[str, dict[int, float]] = {k: {} for k in kinds}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for items in (int(n) for n in args.items.split(",")):
            truth = Path(scratch) / f"truth-{items}.npy"
            for kind in kinds:
                estimate = estimate_build(builds[kind], items)
                if estimate is not None and estimate > args.time_cap_s:
                    r = {"error": f"skipped: build estimated at {estimate / 60:.0f} min from the smaller catalogue, "
                                  f"over the {args.time_cap_s / 60:.0f} min cap"}
                else:
                    print(f"{items:,} items, {kind}...", file=sys.stderr, flush=True)
                    r = measure(args, items, kind, truth, 2 * args.time_cap_s + 300)
                if "build_s" in r:
                    builds[kind][items] = r["build_s"]
                results.append((items, kind, r))
                print("\n".join(table([results[-1]]).splitlines()[2:]), file=sys.stderr, flush=True)
    import faiss

    print(f"retrieval of top {RECALL_AT} through serving.index, d={args.dim}, {args.centres} centres, spread "
          f"{args.spread}, skew {args.skew}, {args.exclude} excluded items per user, {args.queries} users for recall; "
          f"{platform.node()}, {os.cpu_count()} CPUs, {args.threads} thread(s), device {args.device}, torch "
          f"{torch.__version__}, faiss {faiss.__version__}, {datetime.date.today().isoformat()}")
    print(table(results))
    print("\nreproduce: python -m benchmarks.catalogue " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
