"""`make bench-data`: the streaming preparation (``python -m data.prepare``) at 10M, 30M and 100M events.

    python -m benchmarks.data [--sizes 10,30,100] [--formats csv] [--events-per-user 10] [--dir DIR] [--keep]
                              [-- data.prepare options, e.g. --kcore-users 5 --kcore-items 5]

For each size N (millions of events): writes a synthetic event log of N/10 million users and N/10
million items (10 is ``--events-per-user``; ``data.synthetic.write_event_file``: log-normal lengths,
every item at least once, the rest Zipf 1.1, ratings 1-5, rows shuffled; csv as pyarrow writes it,
quoted header included), then runs ``python -m data.prepare`` on it in a subprocess of its own and reports that
process's wall time and peak resident memory (``ru_maxrss`` from ``wait4``: the subprocess alone, not
this one, which writes the files). Time per million events shows whether the time is linear in the
events; the goal is a peak under 8 GiB at 100M events.

Each file is deleted after its run (``--keep`` keeps them, and reuses a kept one); a size whose file,
scratch space and output would not fit on the disk is skipped, and the table says so. Prints the
table and the command that reproduces it.
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
from dataclasses import dataclass
from pathlib import Path

from data.synthetic import EventFileConfig, SyntheticConfig, write_event_file

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_EVENT_ON_DISK = 110
"""File (~30 bytes/event as csv), scratch (~30) and output (~16), with room to spare."""


@dataclass
class Row:
    size_m: int
    fmt: str
    events: int = 0
    users: int = 0
    items: int = 0
    file_gb: float = 0.0
    write_s: float = 0.0
    prepare_s: float = 0.0
    peak_gib: float = 0.0
    output_gb: float = 0.0
    note: str = ""


def event_file(size_m: int, fmt: str, per_user: int = 10) -> EventFileConfig:
    n = size_m * 1_000_000 // per_user  # users, and as many items
    synthetic = SyntheticConfig(num_users=n, num_items=n, mean_length=float(per_user), length_sigma=1.0, min_length=2,
                                max_length=2000, zipf_exponent=1.1, min_item_events=1, seed=0)
    return EventFileConfig(synthetic, fmt=fmt)


def run_prepare(command: list[str], log: Path) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in GiB) of one subprocess."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024 / 2**30  # ru_maxrss: KiB


def size_of(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1e9
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def measure(size_m: int, fmt: str, work: Path, keep: bool, extra: list[str], per_user: int = 10) -> Row:
    row = Row(size_m, fmt)
    config = event_file(size_m, fmt, per_user)
    path = work / f"events-{size_m}m-{per_user}.{fmt}"
    root = work / "prepared"
    needed = size_m * 1e6 * BYTES_PER_EVENT_ON_DISK
    free = shutil.disk_usage(work).free
    if not path.exists() and free < needed:
        row.note = f"skipped: needs ~{needed / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"
        return row
    if not path.exists():
        start = time.perf_counter()
        write_event_file(path.with_suffix(".part"), config)
        path.with_suffix(".part").rename(path)
        row.write_s = time.perf_counter() - start
    row.file_gb = size_of(path)
    name = f"bench-{size_m}m-{per_user}-{fmt}"
    command = [sys.executable, "-m", "data.prepare", "--dataset", str(path), "--format", fmt, "--root", str(root),
               "--name", name, "--force", *(["--id-type", "int"] if fmt == "csv" else []), *extra]
    status, row.prepare_s, row.peak_gib = run_prepare(command, work / f"{name}.log")
    if status != 0:
        row.note = f"prepare failed ({status}): see {work / (name + '.log')}"
    else:
        manifest = json.loads((root / name / "manifest.json").read_text())
        row.events, row.users, row.items = (manifest["counts"][k] for k in ("interactions", "users", "items"))
        row.output_gb = size_of(root / name)
    shutil.rmtree(root / name, ignore_errors=True)
    if not keep:
        path.unlink(missing_ok=True)
    return row


def table(rows: list[Row]) -> str:
    head = ("| events | users | items | input | file GB | write s | prepare s | s per M events | peak RSS GiB "
            "| prepared GB |")
    lines = [head, "|" + "--:|" * 3 + "---|" + "--:|" * 6]
    for r in rows:
        if r.note and not r.events:
            lines.append(f"| {r.size_m}M (nominal) | | | {r.fmt} | {r.file_gb:.2f} | | | | | {r.note} |")
            continue
        per_m = r.prepare_s / (r.events / 1e6)
        write = f"{r.write_s:.0f}" if r.write_s else "(kept)"
        lines.append(f"| {r.events:,} | {r.users:,} | {r.items:,} | {r.fmt} | {r.file_gb:.2f} | {write} | "
                     f"{r.prepare_s:.0f} | {per_m:.2f} | {r.peak_gib:.2f} | {r.output_gb:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,30,100", help="millions of events, comma-separated")
    ap.add_argument("--formats", default="csv", help="csv, parquet or both (comma-separated)")
    ap.add_argument("--dir", default="/tmp/genrec-bench-data", help="for the files (several GB at 100M events)")
    ap.add_argument("--events-per-user", type=int, default=10,
                    help="mean events per user (users = items = events / this; default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the event files (and reuse kept ones)")
    ap.add_argument("prepare_args", nargs="*", help="passed on to data.prepare, e.g. --partition-events=4000000")
    args = ap.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in args.formats.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"{size}M events, {fmt}: writing and preparing ...", file=sys.stderr, flush=True)
            rows.append(measure(size, fmt, work, args.keep, args.prepare_args, args.events_per_user))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    kcore = " ".join(args.prepare_args) or "default k-core (2, 1)"
    print(f"data.prepare on synthetic logs ({platform.node()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today().isoformat()}): users = items = events / {args.events_per_user}, ids as "
          f"integers, {kcore}")
    print(table(rows))
    print("\nreproduce: python -m benchmarks.data " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
