"""`make bench-engine`: the inference engine's KV cache and streaming generation, side by side.

    python -m benchmarks.engine [--artifact runs/latest/export] [--device cpu|cuda] [--history 200]

Engine-level (no gRPC), one model thread, the same work items the server submits:
  recompute     one request whose history (``--history`` events) is computed in full (``Query``)
  kv-cache      the same user after one new event: the cached prefix + 1 token (``Prefill`` + ``Score``);
                on CUDA also with that token replayed from the decode step's CUDA graph
  prefill       the cache-path prefill of the whole history from nothing (what a cache miss costs)
  generate      greedy ``Decode`` steps for ``--generate`` items: time to the first item and to all,
                beside the same generation recomputing the growing sequence at every step
  cuda graphs   (``--device cuda``) one decode step of 1..8 generations, eager against a CUDA graph
  scheduling    ``--requests`` generations of 1..``--generate`` items (seeded), ``--slots`` at a time:
                continuous (a finished generation's slot goes to the next one at once) against static
                (the next group starts when the whole group has finished; "padded" also keeps computing
                the finished ones until then, as a padded batch does), items per second

Prints a table of medians and the command that reproduces it. With no ``--artifact`` it uses an
ML-1M-sized random export (3706 items, d=50, 2 blocks), as ``make bench-serve`` does.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.serve import realistic_artifact
from serving.artifact import load_artifact
from serving.engine import Engine
from serving.work import Decode, Prefill, Query, Score


def timed(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def host_profile(name: str, fn, device: torch.device, reps: int = 10) -> str:
    """Per call of ``fn``: host (CPU) time, ops dispatched, kernels launched, host<->device copies and
    the ops whose own host time is largest. A step bound by the host shows it here, not in a median."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
    events = prof.key_averages()

    def per_call(match) -> float:
        return sum(e.count for e in events if match(e.key)) / reps

    host_ms = sum(e.self_cpu_time_total for e in events) / reps / 1000
    lines = [f"\nhost profile of one {name}: {host_ms:.2f} ms in torch ops (the rest is Python), "
             f"{per_call(lambda k: k.startswith('aten::')):.0f} aten ops, "
             f"{per_call(lambda k: 'LaunchKernel' in k):.0f} kernel launches, "
             f"{per_call(lambda k: k.startswith('cudaMemcpy')):.0f} copies, "
             f"{per_call(lambda k: k.endswith('Synchronize')):.0f} synchronisations, "
             f"{per_call(lambda k: k == 'aten::_local_scalar_dense'):.0f} reads of a scalar"]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    lines += [f"  {e.key[:48]:48s} {e.count / reps:6.1f} calls  {e.self_cpu_time_total / reps / 1000:.3f} ms"
              for e in top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--generate", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--profile", action="store_true",
                    help="also print where the host time of a recompute and a kv-cache step goes (torch.profiler)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    artifact = load_artifact(args.artifact or realistic_artifact(args.history))
    engine = Engine(artifact, device, kv_cache_bytes=256 << 20)
    n = min(args.history, engine.max_seq_len)
    rng = np.random.default_rng(0)
    items = rng.integers(1, engine.num_items + 1, n).astype(np.int64)
    stamps = np.cumsum(rng.integers(0, 3600, n)).astype(np.int64)
    query = Query(items, stamps, top_k=10, exclude=np.unique(items), candidates=None, chunk_size=10)
    prefix = Query(items[:-1], stamps[:-1], 10, np.unique(items[:-1]), None, 10)

    def recompute():
        engine.compute([query])

    def incremental(e: Engine = engine):  # a user whose n-1 events are cached sends one more
        e.cache.put("u", base, prefix.items, prefix.timestamps)  # as the engine puts: host copies at hand
        (step,) = e.compute([Prefill("u", items, stamps, n)])
        assert step.computed == 1
        e.compute([Score(step.state, query)])

    def prefill_all():
        (step,) = engine.compute([Prefill(None, items, stamps, n)])
        engine.compute([Score(step.state, query)])

    (base_step,) = engine.compute([Prefill(None, prefix.items, prefix.timestamps, n)])
    base = base_step.state
    rows = [("recompute (full history)", timed(recompute, args.reps, device)),
            ("kv-cache (cached prefix + 1 event)", timed(incremental, args.reps, device)),
            ("prefill from nothing (cache path)", timed(prefill_all, args.reps, device))]
    if device.type == "cuda":  # the one new event replayed from the decode step's CUDA graph
        graphed = Engine(artifact, device, kv_cache_bytes=256 << 20, cuda_graphs=True)
        rows.append(("kv-cache + CUDA graph (cached prefix + 1 event)",
                     timed(lambda: incremental(graphed), args.reps, device)))
        assert graphed.graphs.replays > 0, "the one-event prefill did not go through the graph"

    if args.profile:
        for name, fn in (("recompute", recompute), ("kv-cache step", incremental)):
            print(host_profile(name, fn, device))

    # Generation starts from a shorter history, so the generated items fit in the window and each step
    # appends to the cache instead of sliding (which recomputes).
    g = max(1, min(n, engine.max_seq_len - args.generate))
    g_items, g_stamps = items[:g], stamps[:g]
    (full,) = engine.compute([Prefill(None, g_items, g_stamps, g)])
    first, total = [], []
    for _ in range(max(3, args.reps // 4)):
        state, banned = full.state, np.unique(g_items)
        t0 = time.perf_counter()
        for step in range(args.generate):
            (out,) = engine.compute([Decode(state, banned, 0.0, int(g_stamps[-1]))])
            state, banned = out.state, np.append(banned, out.item)
            if step == 0:
                first.append((time.perf_counter() - t0) * 1000)
        total.append((time.perf_counter() - t0) * 1000)

    def generate_without_cache():  # the growing sequence computed in full at every step
        seq, ts, banned = list(g_items), list(g_stamps), np.unique(g_items)
        for _ in range(args.generate):
            q = Query(np.array(seq[-engine.max_seq_len:]), np.array(ts[-engine.max_seq_len:]), 1, banned, None, 1)
            (rec,) = engine.compute([q])
            item = int(rec.items[0])
            seq.append(item)
            ts.append(ts[-1])
            banned = np.append(banned, item)

    no_cache = timed(generate_without_cache, max(2, args.reps // 10), device)

    sched = scheduling(engine, args, rng)
    graph_rows = cuda_graph_steps(artifact, args, rng) if device.type == "cuda" else []

    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"\nbench-engine  {datetime.date.today()}  {card}  torch {torch.__version__}  "
          f"history {n}, {engine.num_items} items, {len(engine.encoder.blocks)} blocks, "
          f"{args.torch_threads} thread(s)\n")
    print("| request | median ms |\n|---|--:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    print(f"\nkv-cache speed-up over recompute: {rows[0][1] / rows[1][1]:.1f}x"
          + (f"; with the CUDA graph: {rows[0][1] / rows[3][1]:.1f}x" if len(rows) > 3 else ""))
    print(f"\ngenerate {args.generate} items after a history of {g} (greedy, one request):\n")
    print("| variant | first item ms | all items ms | ms / item |\n|---|--:|--:|--:|")
    print(f"| kv-cache (Decode steps) | {statistics.median(first):.2f} | {statistics.median(total):.1f} | "
          f"{statistics.median(total) / args.generate:.2f} |")
    print(f"| no cache (recompute the growing sequence) | - | {no_cache:.1f} | {no_cache / args.generate:.2f} |")
    print(f"\n{args.requests} generations of 1..{args.generate} items ({sched['items']} in all), {args.slots} at "
          "a time, histories of 50, prefilled beforehand:\n")
    print("| scheduling | model steps | seconds | items / s |\n|---|--:|--:|--:|")
    for name in ("static, padded", "static", "continuous"):
        steps, seconds = sched[name]
        print(f"| {name} | {steps} | {seconds:.2f} | {sched['items'] / seconds:.0f} |")
    print(f"\ncontinuous / static throughput: {sched['static'][1] / sched['continuous'][1]:.2f}x; "
          f"continuous / static padded: {sched['static, padded'][1] / sched['continuous'][1]:.2f}x")
    full = -(-sched["items"] // args.slots)  # every step with all slots busy: the fewest steps possible
    print(f"model steps, static / continuous: {sched['static'][0] / sched['continuous'][0]:.2f}x; static / "
          f"{full} (all slots always busy): {sched['static'][0] / full:.2f}x. With steps of equal cost no "
          f"scheduler gains more than that; for lengths uniform in 1..{args.generate} the limit over any number "
          f"of slots is {args.generate} / {(args.generate + 1) / 2:g} = {2 * args.generate / (args.generate + 1):.2f}x")
    if graph_rows:
        print("\ndecode step (greedy, histories of 100), eager against CUDA graphs:\n")
        print("| batch | eager ms | CUDA graph ms | speed-up |\n|--:|--:|--:|--:|")
        for batch, eager_ms, graph_ms in graph_rows:
            print(f"| {batch} | {eager_ms:.3f} | {graph_ms:.3f} | {eager_ms / graph_ms:.2f}x |")
    else:
        print("\nCUDA graphs: not measured (needs --device cuda)")
    print("reproduce: python -m benchmarks.engine " + " ".join(sys.argv[1:]))
    return 0


def cuda_graph_steps(artifact, args, rng: np.random.Generator) -> list[tuple[int, float, float]]:
    """Median ms of one Decode step of B generations, eager and through a CUDA graph (same states)."""
    device = torch.device(args.device)
    eager, graphed = Engine(artifact, device), Engine(artifact, device, cuda_graphs=True)
    rows = []
    for batch in (1, 2, 4, 8):
        decodes = []
        for _ in range(batch):
            items = rng.integers(1, eager.num_items + 1, 100).astype(np.int64)
            stamps = np.cumsum(rng.integers(0, 3600, 100)).astype(np.int64)
            (done,) = eager.compute([Prefill(None, items, stamps, 100)])
            decodes.append(Decode(done.state, np.unique(items), 0.0, int(stamps[-1])))
        eager_ms = timed(lambda work=decodes: eager.compute(work), args.reps * 5, device)
        graph_ms = timed(lambda work=decodes: graphed.compute(work), args.reps * 5, device)
        rows.append((batch, eager_ms, graph_ms))
    return rows


def scheduling(engine: Engine, args, rng: np.random.Generator) -> dict:
    """Greedy generations of mixed length through ``Decode`` steps, scheduled two ways."""
    lengths = rng.integers(1, args.generate + 1, args.requests).tolist()
    starts = []
    for _ in range(args.requests):
        items = rng.integers(1, engine.num_items + 1, 50).astype(np.int64)
        stamps = np.cumsum(rng.integers(0, 3600, 50)).astype(np.int64)
        (done,) = engine.compute([Prefill(None, items, stamps, 50)])
        starts.append((done.state, np.unique(items), int(stamps[-1])))

    def run(continuous: bool, padded: bool = False) -> tuple[int, float]:
        waiting = list(range(args.requests))
        active: dict[int, tuple] = {}  # request -> (state, banned, items left)
        finished: dict[int, tuple] = {}  # padded static: done, still computed until its group ends
        steps, t0 = 0, time.perf_counter()
        while waiting or active:
            if continuous or not active:  # static: a new group only when the last one has finished
                finished.clear()
                while waiting and len(active) < args.slots:
                    r = waiting.pop(0)
                    active[r] = (starts[r][0], starts[r][1], lengths[r])
            order = list(active)
            work = [Decode(active[r][0], active[r][1], 0.0, starts[r][2]) for r in order]
            work += [Decode(st, banned, 0.0, starts[r][2]) for r, (st, banned) in finished.items()]
            outs = engine.compute(work)
            steps += 1
            for r, out in zip(order, outs, strict=False):
                _, banned, left = active[r]
                if left == 1:
                    del active[r]
                    if padded:
                        finished[r] = (out.state, np.append(banned, out.item))
                else:
                    active[r] = (out.state, np.append(banned, out.item), left - 1)
        return steps, time.perf_counter() - t0

    run(True)  # warm-up
    return {"items": sum(lengths), "static, padded": run(False, padded=True), "static": run(False),
            "continuous": run(True)}


if __name__ == "__main__":
    raise SystemExit(main())
