"""`make bench-serve`: a load generator for the gRPC server on 127.0.0.1, bounded in time.

    python -m benchmarks.serve [--suite compare|closed|open|soak] [--artifact DIR] [options]

Suites:
  compare  dynamic batching against batch size 1: for each, a closed loop finds the saturation
           throughput, then a bisection over open-loop rates finds the highest achieved QPS whose p99
           stays under --p99-bound-ms with every reply OK; reports both and their ratio (default).
  closed   --concurrency callers, each sending its next request as soon as the last one returns.
  open     requests at a fixed --qps whatever the server does (latency counted from the scheduled send
           time, so a slow server cannot hide its queueing).
  engine   no gRPC: Engine.compute alone at batch sizes 1..64, the ceiling that batching can reach.
  soak     open loop at --soak-factor times the saturation throughput for --duration seconds; checks the
           server stays up, answers only OK / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, and samples its RSS.
  generations (issue #20) --generations Generate streams of --generate-items items (started over --ramp-s) with
           Recommend probes (--probe-qps) for --probe-s seconds, then SIGTERM with the streams active: how
           generations and probes were answered, and how fast the server exited. Twice: with the
           server's default limits, and with --max-generations as high as --generations (and 64 more RPC slots).
  big      (issue #20) --big-requests concurrent requests of ~--big-request-mib MiB (over the server's
           1 MiB request limit, under its 4 MiB transport limit): its RSS before, at the peak, after.
  overload (issue #20) saturation (closed loop), then --overload-factor times it, open loop over
           --client-procs processes, for --overload-s seconds: goodput (OK/s) as a share of saturation
           against --goodput-goal, the server's RSS, the codes it answered, and what it computed
           for nothing (requests computed but not answered OK).

The server runs as its own process (`python -m serving.server`), started per configuration. Without
--artifact a random-weight export of ML-1M's size (3706 items, 6040 users, d=50, 2 HSTU blocks, max
history 200) is written once under .cache/bench-serve/. Requests name a known user (history from the
export, --history-len events), as a production caller would. Prints a table and the reproducing command.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import functools
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.batcher import BatcherConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-serve"
ACCEPTED_UNDER_OVERLOAD = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
REFUSED_BACKOFF_S = 0.05
"""A closed-loop caller refused for a full queue waits this long before its next request, as the API
asks ("retry with backoff"): without it, callers at the admission limit spin on refusals and the loop
measures those instead of the server's throughput."""


# --- the artifact --------------------------------------------------------------------------------
def realistic_artifact(history_len: int, num_items: int = 3706, num_users: int = 6040) -> Path:
    """ML-1M-sized random export (cached): every user has ``history_len`` events."""
    path = CACHE / f"export-{num_items}x50-h{history_len}-u{num_users}"
    config = path / "config.json"
    # Written again when missing or of an older export format.
    if not config.exists() or json.loads(config.read_text()).get("format") != _export_format():
        # torch imports only when an export must be built
        from benchmarks.random_export import make_random_artifact
        from models.config import ModelConfig

        print(f"writing a random export to {path} ...", file=sys.stderr)
        make_random_artifact(path, num_items=num_items, num_users=num_users, config=ModelConfig(),
                             history_len=(history_len, history_len))
    return path


def _export_format() -> int:
    from serving.artifact import FORMAT_VERSION

    return FORMAT_VERSION


# --- the server process --------------------------------------------------------------------------
@dataclass
class ServerProcess:
    """``python -m serving.server`` on a free loopback port; ``with`` waits until it is SERVING."""

    artifact: Path
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    torch_threads: int
    device: str = "cpu"
    extra: tuple[str, ...] = ()  # more server flags, e.g. ("--kv-cache-mb", "256")
    port: int = 0
    metrics_port: int = 0
    log: list[str] = field(default_factory=list)

    def __enter__(self) -> ServerProcess:
        ready = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "ready.json"
        cmd = [sys.executable, "-m", "serving.server", "--artifact", str(self.artifact), "--port", "0",
               "--max-batch-size", str(self.max_batch_size), "--max-queue-delay-ms", str(self.max_queue_delay_ms),
               "--max-queue-size", str(self.max_queue_size), "--torch-threads", str(self.torch_threads),
               "--metrics-port", "0", "--device", self.device, "--ready-file", str(ready), *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Keep draining its log so a full pipe never blocks the server.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        give_up = time.monotonic() + 300
        while not ready.exists() and self.proc.poll() is None and time.monotonic() < give_up:
            time.sleep(0.1)
        if not ready.exists():
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        ports = json.loads(ready.read_text())
        shutil.rmtree(ready.parent)
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        self.ps = psutil.Process(self.proc.pid)
        return self

    def scrape(self) -> dict[str, float]:
        """The server's Prometheus samples, summed over labels except ``code`` and a histogram's ``le``."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        samples: collections.Counter[str] = collections.Counter()
        for name, labels, value in re.findall(r"^(genrec_\w+?)(\{[^}]*\})? (\S+)$", text, re.M):
            kept = re.search(r'(?:code|le)="([^"]+)"', labels or "")
            samples[name + (f"[{kept.group(1)}]" if kept else "")] += float(value)
        return dict(samples)

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- load ----------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    label: str
    mode: str
    offered: str
    duration_s: float
    codes: collections.Counter[str]
    latencies_ms: list[float]  # OK replies only
    not_ok_at: list[float] = field(default_factory=list)  # time.time() each non-OK request was sent
    started_at: float | None = None  # time.time() of the run's first request

    def not_ok_by_second(self) -> str:
        """Non-OK replies per second of the run, e.g. "0s: 12, 7s: 3": a burst at the start (a cold
        server) reads differently from refusals spread over the run (too little capacity)."""
        if not self.not_ok_at:
            return "none"
        first = min(self.not_ok_at) if self.started_at is None else self.started_at
        seconds = collections.Counter(int(t - first) for t in self.not_ok_at)
        return ", ".join(f"{s}s: {n}" for s, n in sorted(seconds.items()))

    @property
    def throughput(self) -> float:
        return self.codes["OK"] / self.duration_s

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def all_ok(self) -> bool:
        return set(self.codes) == {"OK"}


def requests(num_users: int, top_k: int, seed: int = 0) -> Iterator[pb.RecommendRequest]:
    rng = np.random.default_rng(seed)
    while True:
        yield pb.RecommendRequest(user_id=str(int(rng.integers(num_users))), top_k=top_k)


async def _one(stub: pb_grpc.RecommenderServiceStub, request: pb.RecommendRequest, start: float, timeout: float,
               result: LoadResult) -> str:
    """Sends ``request``, counts its reply in ``result`` and returns the reply's code name."""
    try:
        await stub.Recommend(request, timeout=timeout)
        code = "OK"
        result.latencies_ms.append((time.perf_counter() - start) * 1000)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        result.not_ok_at.append(time.time() - (time.perf_counter() - start))
    result.codes[code] += 1
    return code


def history_requests(length: int, num_items: int, seed: int) -> Iterator[pb.RecommendRequest]:
    """Anonymous requests carrying ``length`` random events: each is computed from nothing."""
    from benchmarks.random_export import raw_item_id

    rng = np.random.default_rng(seed)
    while True:
        items = rng.integers(1, num_items + 1, length)
        events = [pb.Event(item_id=raw_item_id(int(i)), timestamp=1e9 + 60 * n) for n, i in enumerate(items)]
        yield pb.RecommendRequest(history=events, top_k=10)


async def closed_loop(address: str, concurrency: int, duration: float, timeout: float, num_users: int, top_k: int,
                      label: str, source: Iterator[pb.RecommendRequest] | None = None,
                      start_at: float | None = None) -> LoadResult:
    result = LoadResult(label, "closed", f"c={concurrency}", duration, collections.Counter(), [])
    source = source or requests(num_users, top_k)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        if start_at is not None and (wait := start_at - time.time()) > 0:
            await asyncio.sleep(wait)
        result.started_at = time.time()
        stop_at = time.perf_counter() + duration

        async def caller() -> None:
            while (now := time.perf_counter()) < stop_at:
                if await _one(stub, next(source), now, timeout, result) == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(REFUSED_BACKOFF_S)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return result


async def open_loop(address: str, qps: float, duration: float, timeout: float, num_users: int, top_k: int,
                    label: str, on_tick=None, source: Iterator[pb.RecommendRequest] | None = None,
                    start_at: float | None = None, phase: float = 0.0) -> LoadResult:
    """Sends at a fixed rate (evenly spaced); each latency counts from the request's scheduled time.
    ``start_at`` (a ``time.time()``) and ``phase`` (seconds) interleave several client processes."""
    result = LoadResult(label, "open", f"{qps:.0f}/s", duration, collections.Counter(), [])
    source = source or requests(num_users, top_k)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        start = time.perf_counter() + phase + (0.0 if start_at is None else max(0.0, start_at - time.time()))
        result.started_at = time.time() + (start - phase - time.perf_counter())
        tasks: set[asyncio.Task[None]] = set()
        next_tick = 0.0
        for i in range(int(qps * (duration - phase))):
            scheduled = start + i / qps
            if (delay := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(stub, next(source), scheduled, timeout, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_tick is not None and scheduled - start >= next_tick:
                on_tick(scheduled - start)
                next_tick += 5.0
        await asyncio.gather(*tasks)
    return result


# One Python gRPC client process tops out near a thousand RPCs a second, about what the server
# serves: a single-process load generator would measure itself. Closed and open loops of known-user
# requests are spread over --client-procs processes (spawned once, reused) and merged.
_POOL: ProcessPoolExecutor | None = None


def _load_part(mode: str, address: str, level: float, duration: float, timeout: float, num_users: int,
               top_k: int, label: str, seed: int, start_at: float, phase: float) -> LoadResult:
    source = requests(num_users, top_k, seed)
    if mode == "closed":
        return asyncio.run(closed_loop(address, int(level), duration, timeout, num_users, top_k, label, source,
                                       start_at=start_at))
    return asyncio.run(open_loop(address, level, duration, timeout, num_users, top_k, label, source=source,
                                 start_at=start_at, phase=phase))


def load(args: argparse.Namespace, mode: str, address: str, level: float, duration: float, label: str) -> LoadResult:
    """A closed (``level`` callers) or open (``level`` requests/s) loop over the client processes."""
    global _POOL
    procs = max(1, min(args.client_procs, int(level))) if mode == "closed" else args.client_procs
    if procs == 1:
        return _load_part(mode, address, level, duration, args.timeout, args.num_users, args.top_k, label, 0,
                          time.time(), 0.0)
    if _POOL is None:
        _POOL = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
        list(_POOL.map(time.sleep, [0.5] * args.client_procs))  # every worker started and imported
    start_at = time.time() + 0.3
    if mode == "closed":  # the callers split as evenly as they go
        levels = [int(level) // procs + (k < int(level) % procs) for k in range(procs)]
        phases = [0.0] * procs
    else:  # each process sends every procs-th request of one evenly spaced stream
        levels, phases = [level / procs] * procs, [k / level for k in range(procs)]
    parts = list(_POOL.map(functools.partial(_load_part, mode, address), levels, [duration] * procs,
                           [args.timeout] * procs, [args.num_users] * procs, [args.top_k] * procs,
                           [label] * procs, range(procs), [start_at] * procs, phases))
    offered = f"c={int(level)}" if mode == "closed" else f"{level:.0f}/s"
    return LoadResult(label, mode, offered, duration, sum((p.codes for p in parts), collections.Counter()),
                      [x for p in parts for x in p.latencies_ms], [x for p in parts for x in p.not_ok_at],
                      min((p.started_at for p in parts if p.started_at is not None), default=None))


# --- suites --------------------------------------------------------------------------------------
def server_for(args: argparse.Namespace, artifact: Path, batch_size: int) -> ServerProcess:
    return ServerProcess(artifact, batch_size, args.max_queue_delay_ms, args.max_queue_size, args.torch_threads,
                         args.device, tuple(shlex.split(args.server_args)))


def saturation(args, server: ServerProcess, label: str) -> LoadResult:
    address = f"127.0.0.1:{server.port}"
    load(args, "closed", address, args.concurrency, 2.0, label)  # warm-up
    return load(args, "closed", address, args.concurrency, args.duration, label)


def suite_compare(args, artifact: Path) -> list[LoadResult]:
    """Per server: closed-loop saturation, then a bisection over open-loop rates (as fractions of it) for
    the highest one whose p99 stays under the bound with every reply OK."""
    rows: list[LoadResult] = []
    best: dict[str, float] = {}
    for label, batch in (("batch size 1", 1), (f"dynamic (max {args.max_batch_size})", args.max_batch_size)):
        with server_for(args, artifact, batch) as server:
            sat = saturation(args, server, label)
            rows.append(sat)
            best[label] = 0.0
            lo, hi = 0.0, 1.0
            for fraction in [args.bisect_from] + [None] * (args.bisect_steps - 1):
                fraction = fraction if fraction is not None else (lo + hi) / 2
                r = load(args, "open", f"127.0.0.1:{server.port}", fraction * sat.throughput, args.duration, label)
                rows.append(r)
                if r.all_ok and r.percentile(99) <= args.p99_bound_ms:
                    lo, best[label] = fraction, max(best[label], r.throughput)
                else:
                    hi = fraction
    one, dyn = best.values()
    print(f"\nhighest QPS with p99 <= {args.p99_bound_ms:.0f} ms and every reply OK: "
          + ", ".join(f"{k}: {v:.0f}" for k, v in best.items())
          + (f"; dynamic / batch-1 = {dyn / one:.2f}x" if one else ""))
    return rows


def suite_chunking(args, artifact: Path) -> list[LoadResult]:
    """Short requests (5 events) at an open-loop rate while closed-loop callers keep sending long
    anonymous histories (the model's max_seq_len), on a KV-cache server with and without chunked prefill."""
    from serving.artifact import load_artifact

    art = load_artifact(artifact)
    max_seq_len, num_items = int(art.model_config["max_seq_len"]), art.num_items
    async def both(address: str, label: str) -> list[LoadResult]:
        return list(await asyncio.gather(
            closed_loop(address, args.long_callers, args.duration, args.timeout, 0, 10, f"{label}: long",
                        source=history_requests(max_seq_len, num_items, 1)),
            open_loop(address, args.qps, args.duration, args.timeout, 0, 10, f"{label}: short",
                      source=history_requests(5, num_items, 2))))

    rows = []
    chunk = args.prefill_chunk
    for label, size in ((f"no chunking ({max_seq_len})", max_seq_len), (f"chunks of {chunk}", chunk)):
        extra = ("--kv-cache-mb", "256", "--prefill-chunk-tokens", str(size))
        with ServerProcess(artifact, args.max_batch_size, args.max_queue_delay_ms, args.max_queue_size,
                           args.torch_threads, args.device, extra) as server:
            asyncio.run(both(f"127.0.0.1:{server.port}", label))  # warm-up
            rows.extend(asyncio.run(both(f"127.0.0.1:{server.port}", label)))
    return rows


def suite_soak(args, artifact: Path) -> tuple[list[LoadResult], bool]:
    """Returns the rows and whether the server passed: alive, expected codes only, RSS flat (< 5%
    growth over the second half)."""
    with server_for(args, artifact, args.max_batch_size) as server:
        sat = saturation(args, server, "saturation")
        sat_samples = server.scrape()
        qps = args.soak_factor * sat.throughput
        rss: list[tuple[float, float]] = [(0.0, server.rss_mib())]
        print(f"soak: {qps:.0f} req/s offered ({args.soak_factor:g}x saturation {sat.throughput:.0f}) "
              f"for {args.soak_s:.0f}s", file=sys.stderr)
        soak = asyncio.run(open_loop(f"127.0.0.1:{server.port}", qps, args.soak_s, args.timeout, args.num_users,
                                     args.top_k, f"soak {args.soak_factor:g}x",
                                     on_tick=lambda t: rss.append((t, server.rss_mib()))))
        rss.append((args.soak_s, server.rss_mib()))
        alive = server.alive()
        after_samples = server.scrape() if alive else {}
        after = asyncio.run(closed_loop(f"127.0.0.1:{server.port}", 1, 1.0, args.timeout, args.num_users,
                                        args.top_k, "after soak")) if alive else None
    unexpected = set(soak.codes) - ACCEPTED_UNDER_OVERLOAD
    print("\nRSS (MiB) during the soak: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss))
    half = [m for t, m in rss if t >= args.soak_s / 2]
    print(f"server alive: {alive}; replies: {dict(soak.codes)}; unexpected codes: {sorted(unexpected) or 'none'}; "
          f"RSS second half {min(half):.0f}-{max(half):.0f} MiB (end - middle {half[-1] - half[0]:+.0f} MiB); "
          f"after the soak: {dict(after.codes) if after else 'server gone'}")
    if after_samples:
        d = {k: after_samples.get(k, 0.0) - sat_samples.get(k, 0.0) for k in after_samples}
        batches = d["genrec_batch_size_count"]
        served = {k.split("[")[1][:-1]: int(v) for k, v in d.items() if k.startswith("genrec_requests_total[") and v}
        print(f"server side during the soak: replies {served}; {batches:.0f} batches, mean size "
              f"{d['genrec_batch_size_sum'] / max(batches, 1):.1f}, mean compute "
              f"{d['genrec_compute_latency_seconds_sum'] / max(batches, 1) * 1000:.0f} ms")
    passed = alive and not unexpected and half[-1] - half[0] < 0.05 * half[0]
    print(f"soak {'passed' if passed else 'FAILED'}")
    return [sat, soak] + ([after] if after else []), passed


@contextlib.contextmanager
def sampling_rss(server: ServerProcess, every_s: float = 5.0) -> Iterator[list[tuple[float, float]]]:
    """(seconds, RSS MiB) of the server every ``every_s`` while the block runs, and at both ends."""
    start = time.perf_counter()
    samples = [(0.0, server.rss_mib())]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s) and server.alive():
            samples.append((time.perf_counter() - start, server.rss_mib()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        if server.alive():
            samples.append((time.perf_counter() - start, server.rss_mib()))


def rss_flat(samples: list[tuple[float, float]], duration: float) -> tuple[bool, str]:
    """Whether RSS grew less than 5% over the second half of the run, and a line saying so."""
    half = [m for t, m in samples if t >= duration / 2] or [samples[-1][1]]
    line = (f"RSS (MiB) every 5 s: {', '.join(f'{m:.0f}' for _, m in samples)}; second half {min(half):.0f}-"
            f"{max(half):.0f} (end - middle {half[-1] - half[0]:+.0f})")
    return half[-1] - half[0] < 0.05 * half[0], line


def server_side(before: dict[str, float], after: dict[str, float]) -> str:
    """What the server counted between two scrapes: replies by code, requests computed, batches."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("genrec_batch_size_count", 0.0)
    computed = d.get("genrec_batch_size_sum", 0.0)
    replies = {k.split("[")[1][:-1]: int(v) for k, v in d.items() if k.startswith("genrec_requests_total[") and v}
    ok = replies.get("OK", 0)
    return (f"server side: replies {replies}; {computed:.0f} requests computed in {batches:.0f} batches (mean size "
            f"{computed / max(batches, 1):.1f}, mean compute "
            f"{d.get('genrec_compute_latency_seconds_sum', 0.0) / max(batches, 1) * 1000:.0f} ms), "
            f"{ok / max(computed, 1):.0%} of them answered OK; {_slow_batches(d)}")


def _slow_batches(d: dict[str, float]) -> str:
    """How many batches took longer than each of a few latency buckets (stalls show up here)."""
    count = d.get("genrec_compute_latency_seconds_count", 0.0)
    over = [f"> {float(le) * 1000:g} ms: {count - d[f'genrec_compute_latency_seconds_bucket[{le}]']:.0f}"
            for le in ("0.02", "0.05", "0.1", "0.5") if f"genrec_compute_latency_seconds_bucket[{le}]" in d]
    return "batches " + ", ".join(over) if over else "no batch times"


def suite_overload(args, artifact: Path) -> tuple[list[LoadResult], bool]:
    """Issue #20, 3: a trusted server keeps its goodput near saturation under overload by refusing
    early what it cannot serve in time. Passes if OK/s under --overload-factor x saturation is at
    least --goodput-goal of saturation, the server stays up, answers only OK / RESOURCE_EXHAUSTED /
    DEADLINE_EXCEEDED, and its RSS stays flat."""
    with server_for(args, artifact, args.max_batch_size) as server:
        address = f"127.0.0.1:{server.port}"
        sat = saturation(args, server, "saturation")
        before = server.scrape()
        qps = args.overload_factor * sat.throughput
        print(f"overload: {qps:.0f} req/s offered ({args.overload_factor:g}x saturation {sat.throughput:.0f} OK/s) "
              f"for {args.overload_s:.0f}s over {args.client_procs} client processes", file=sys.stderr)
        with sampling_rss(server) as rss:
            over = load(args, "open", address, qps, args.overload_s, f"{args.overload_factor:g}x saturation")
        alive = server.alive()
        after = server.scrape() if alive else {}
        check = load(args, "closed", address, 1, 1.0, "after") if alive else None
    unexpected = set(over.codes) - ACCEPTED_UNDER_OVERLOAD
    flat, rss_line = rss_flat(rss, args.overload_s)
    share = over.throughput / sat.throughput
    passed = alive and not unexpected and flat and share >= args.goodput_goal
    print(f"\n{rss_line}\nserver alive: {alive}; unexpected codes: {sorted(unexpected) or 'none'}; "
          f"after: {dict(check.codes) if check else 'server gone'}")
    if after:
        print(server_side(before, after))
    print(f"\n| saturation OK/s | offered req/s | OK/s under overload | share of saturation | goal | result |\n"
          f"|--:|--:|--:|--:|--:|---|\n| {sat.throughput:.0f} | {qps:.0f} | {over.throughput:.0f} | {share:.0%} | "
          f">= {args.goodput_goal:.0%} | {'passed' if passed else 'FAILED'} |")
    return [sat, over] + ([check] if check else []), passed


@dataclass
class GenerationRun:
    """What ``suite_generations`` saw of one server."""

    label: str
    started: int = 0  # streams that produced their first item
    refused_s: list[float] = field(default_factory=list)  # seconds to each refusal of a Generate
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    probes: LoadResult | None = None
    probe_refusals_ms: list[float] = field(default_factory=list)
    active_at_sigterm: int = 0
    exit_code: int | None = None
    exit_s: float = float("nan")


async def _generations(address: str, args: argparse.Namespace, run: GenerationRun, server: ServerProcess) -> None:
    """Starts the streams, probes while they run, then SIGTERMs the server and times its exit."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def generate(user: int, first: asyncio.Future[None]) -> None:
            await asyncio.sleep(user * args.ramp_s / args.generations)  # callers arrive over --ramp-s
            started = time.perf_counter()
            request = pb.GenerateRequest(context=pb.RecommendRequest(user_id=str(user)), num_items=args.generate_items)
            try:
                async for _ in stub.Generate(request, timeout=600):
                    if not first.done():
                        run.started += 1
                        first.set_result(None)
            except grpc.aio.AioRpcError as e:
                if not first.done():
                    run.refused_s.append(time.perf_counter() - started)
                    run.refusals[e.code().name] += 1
            finally:
                if not first.done():
                    first.set_result(None)

        firsts = [loop.create_future() for _ in range(args.generations)]
        streams = [asyncio.create_task(generate(user, first)) for user, first in enumerate(firsts)]
        await asyncio.gather(*firsts)  # every stream generating or refused
        run.probes = LoadResult(run.label, "probes", f"{args.probe_qps:g}/s", args.probe_s, collections.Counter(), [])
        start = time.perf_counter()
        for i in range(int(args.probe_qps * args.probe_s)):
            await asyncio.sleep(max(0.0, start + i / args.probe_qps - time.perf_counter()))
            sent = time.perf_counter()
            try:
                await stub.Recommend(pb.RecommendRequest(user_id=str(i % args.num_users), top_k=args.top_k),
                                     timeout=args.timeout)
                run.probes.codes["OK"] += 1
                run.probes.latencies_ms.append((time.perf_counter() - sent) * 1000)
            except grpc.aio.AioRpcError as e:
                run.probes.codes[e.code().name] += 1
                run.probe_refusals_ms.append((time.perf_counter() - sent) * 1000)
        run.active_at_sigterm = sum(not task.done() for task in streams)
        server.proc.send_signal(signal.SIGTERM)
        sigterm = time.perf_counter()
        while server.proc.poll() is None and time.perf_counter() - sigterm < args.grace_s + 30:
            await asyncio.sleep(0.01)
        run.exit_s, run.exit_code = time.perf_counter() - sigterm, server.proc.poll()
        await asyncio.gather(*streams, return_exceptions=True)


def suite_generations(args, artifact: Path) -> tuple[list[LoadResult], bool]:
    """Issue #20, 1 and 2. Passes if every probe is answered OK or refused at arrival (within
    --arrival-ms), and the server exits 0 within --grace-s + 2 s of SIGTERM, on both servers."""
    runs = []
    roomy = ("--max-generations", str(args.generations), "--max-concurrent-rpcs", str(args.generations + 64))
    for label, flags in (("default limits", ()), (" ".join(roomy), roomy)):
        run = GenerationRun(label)
        server = ServerProcess(artifact, args.max_batch_size, args.max_queue_delay_ms, args.max_queue_size,
                               args.torch_threads, args.device, ("--grace-s", str(args.grace_s), *flags))
        with server:
            asyncio.run(_generations(f"127.0.0.1:{server.port}", args, run, server))
        runs.append(run)
    print(f"\n{args.generations} Generate streams of {args.generate_items} items, Recommend probes at "
          f"{args.probe_qps:g}/s for {args.probe_s:g}s (deadline {args.timeout:g}s), then SIGTERM (--grace-s "
          f"{args.grace_s:g})\n")
    print("| server | generating | Generate refused (slowest) | probes | probe p50 / p99 ms | probes refused "
          "(slowest) | active at SIGTERM | exit code | exit after SIGTERM |\n|---|--:|---|---|--:|---|--:|--:|--:|")
    passed = True
    for r in runs:
        assert r.probes is not None
        refused = f"{sum(r.refusals.values())} {dict(r.refusals)} ({max(r.refused_s, default=0) * 1000:.0f} ms)"
        probe_refused = sum(v for k, v in r.probes.codes.items() if k != "OK")
        slowest = max(r.probe_refusals_ms, default=0.0)
        print(f"| {r.label} | {r.started} | {refused} | {dict(r.probes.codes)} | "
              f"{r.probes.percentile(50):.0f} / {r.probes.percentile(99):.0f} | "
              f"{probe_refused} ({slowest:.0f} ms) | {r.active_at_sigterm} | {r.exit_code} | {r.exit_s:.2f} s |")
        passed &= slowest <= args.arrival_ms and r.exit_code == 0 and r.exit_s <= args.grace_s + 2
    print(f"\ngenerations {'passed' if passed else 'FAILED'} (probes OK or refused within {args.arrival_ms:g} ms; "
          f"exit 0 within grace + 2 s)")
    return [r.probes for r in runs if r.probes is not None], passed


def suite_big(args, artifact: Path) -> tuple[list[LoadResult], bool]:
    """Issue #20, 7: what a burst of large requests from as many callers (one connection each) makes the
    server hold. Passes if the server stays up and answers each INVALID_ARGUMENT (too large) or
    RESOURCE_EXHAUSTED (refused)."""
    ids = ["x" * 1000] * int(args.big_request_mib * 1000)
    request = pb.RecommendRequest(user_id="1", top_k=10, exclude_item_ids=ids)
    result = LoadResult("big requests", "burst", f"{args.big_requests} x {request.ByteSize() / 2**20:.1f} MiB", 0.0,
                        collections.Counter(), [])

    async def burst(address: str) -> None:
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
                    for _ in range(args.big_requests)]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        start = time.perf_counter()
        await asyncio.gather(*(_one(pb_grpc.RecommenderServiceStub(c), request, start, 60, result) for c in channels))
        result.duration_s = time.perf_counter() - start
        await asyncio.gather(*(c.close() for c in channels))

    with server_for(args, artifact, args.max_batch_size) as server:
        before = server.rss_mib()
        with sampling_rss(server, every_s=0.1) as rss:
            asyncio.run(burst(f"127.0.0.1:{server.port}"))
        time.sleep(2)
        after, alive = server.rss_mib(), server.alive()
    print(f"\nserver RSS (MiB): before {before:.0f}, peak {max(m for _, m in rss):.0f}, 2 s after {after:.0f}; "
          f"replies {dict(result.codes)} in {result.duration_s:.1f}s; server alive: {alive}")
    return [result], alive and set(result.codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def suite_engine(args, artifact: Path) -> None:
    """Model time per batch without the server: what dynamic batching can save at most."""
    import torch

    from serving.artifact import load_artifact
    from serving.catalogue import Catalogue
    from serving.engine import Engine
    from serving.validation import RequestLimits, parse_request

    torch.set_num_threads(args.torch_threads)
    art = load_artifact(artifact)
    engine, catalogue = Engine(art, args.device), Catalogue.from_artifact(art)
    limits = RequestLimits(max_seq_len=engine.max_seq_len)
    source = requests(args.num_users, args.top_k)
    print("\n| batch | ms / batch | ms / request | requests/s |\n|------:|-----------:|-------------:|-----------:|")
    for size in (1, 4, 16, 32, 64):
        queries = [parse_request(next(source), catalogue, limits) for _ in range(size)]
        engine.compute(queries)
        reps = max(3, int(64 / size))
        t0 = time.perf_counter()
        for _ in range(reps):
            engine.compute(queries)
        ms = (time.perf_counter() - t0) / reps * 1000
        print(f"| {size:>5} | {ms:>10.2f} | {ms / size:>12.3f} | {size / ms * 1000:>10.0f} |")


def print_table(rows: list[LoadResult]) -> None:
    """A Markdown table, one row per load level."""
    header = ["server", "load", "offered", "OK/s", "p50 ms", "p95 ms", "p99 ms", "replies"]
    lines = [[r.label, r.mode, r.offered, f"{r.throughput:.0f}", f"{r.percentile(50):.1f}", f"{r.percentile(95):.1f}",
              f"{r.percentile(99):.1f}", ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items()))] for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]
    print()
    for i, line in enumerate([header, *lines]):
        print("| " + " | ".join(x.ljust(w) if j in (0, 1, 7) else x.rjust(w)
                                for j, (x, w) in enumerate(zip(line, widths, strict=True))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=["compare", "closed", "open", "soak", "overload", "generations", "big", "engine",
                                       "chunking"],
                   default="compare")
    p.add_argument("--long-callers", type=int, default=4, help="suite chunking: callers sending long histories")
    p.add_argument("--prefill-chunk", type=int, default=16, help="suite chunking: the chunked server's chunk")
    p.add_argument("--artifact", type=Path, default=None, help="an export; default: a random ML-1M-sized one")
    p.add_argument("--history-len", type=int, default=200, help="events per user in the generated export")
    p.add_argument("--num-users", type=int, default=6040)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load level")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop callers")
    p.add_argument("--qps", type=float, default=200.0, help="open-loop rate (suite open)")
    p.add_argument("--timeout", type=float, default=1.0, help="deadline of each request, seconds")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--max-queue-size", type=int, default=BatcherConfig().max_queue_size)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the server runs the model")
    p.add_argument("--server-args", default="", help="more flags of serving.server, e.g. '--max-concurrent-rpcs 128'")
    p.add_argument("--p99-bound-ms", type=float, default=100.0)
    p.add_argument("--bisect-from", type=float, default=0.5,
                   help="first open-loop rate tried, as a fraction of the closed-loop saturation (suite compare)")
    p.add_argument("--bisect-steps", type=int, default=5, help="open-loop rates tried per server (suite compare)")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="load-generator processes (suites compare, closed, open, overload)")
    p.add_argument("--soak-s", type=float, default=60.0)
    p.add_argument("--soak-factor", type=float, default=4.0)
    p.add_argument("--generations", type=int, default=100, help="suite generations: Generate streams at once")
    p.add_argument("--generate-items", type=int, default=1000, help="suite generations: num_items of each")
    p.add_argument("--ramp-s", type=float, default=2.0, help="suite generations: seconds over which the streams start")
    p.add_argument("--probe-qps", type=float, default=10.0, help="suite generations: Recommend probes per second")
    p.add_argument("--probe-s", type=float, default=10.0, help="suite generations: seconds of probes")
    p.add_argument("--grace-s", type=float, default=2.0, help="suite generations: the server's shutdown grace")
    p.add_argument("--arrival-ms", type=float, default=100.0,
                   help="suite generations: a probe refused later than this was not refused at arrival")
    p.add_argument("--big-requests", type=int, default=400, help="suite big: concurrent requests")
    p.add_argument("--big-request-mib", type=float, default=3.8, help="suite big: size of each request")
    p.add_argument("--overload-s", type=float, default=60.0, help="suite overload: seconds of overload")
    p.add_argument("--overload-factor", type=float, default=4.0, help="suite overload: offered / saturation")
    p.add_argument("--goodput-goal", type=float, default=0.7, help="suite overload: least OK/s / saturation")
    args = p.parse_args(argv)

    artifact = args.artifact or realistic_artifact(args.history_len, num_users=args.num_users)
    passed = True
    if args.suite == "engine":
        suite_engine(args, artifact)
        rows = []
    elif args.suite == "compare":
        rows = suite_compare(args, artifact)
    elif args.suite == "chunking":
        rows = suite_chunking(args, artifact)
    elif args.suite == "soak":
        rows, passed = suite_soak(args, artifact)
    elif args.suite == "overload":
        rows, passed = suite_overload(args, artifact)
    elif args.suite == "generations":
        rows, passed = suite_generations(args, artifact)
    elif args.suite == "big":
        rows, passed = suite_big(args, artifact)
    else:
        with server_for(args, artifact, args.max_batch_size) as server:
            address = f"127.0.0.1:{server.port}"
            level = args.concurrency if args.suite == "closed" else args.qps
            before = server.scrape()
            rows = [load(args, args.suite, address, level, args.duration, f"max batch {args.max_batch_size}")]
            print(server_side(before, server.scrape()))
            print(f"not OK, by second of the run: {rows[0].not_ok_by_second()}")
    if _POOL is not None:
        _POOL.shutdown()
    if rows:
        print_table(rows)
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {loadavg}, {datetime.date.today()}")
    print("reproduce: " + shlex.join([sys.executable.replace(str(ROOT) + "/", ""), "-m", "benchmarks.serve",
                                      *(argv if argv is not None else sys.argv[1:])]))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
