"""A table of finished runs (their ``metrics.json``: best epoch by validation, test metrics at it).

    python -m benchmarks.runs_table [runs]            # the table
    python -m benchmarks.runs_table [runs] --best     # the name of the best HSTU run by validation NDCG@10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ["test/hr@10", "test/ndcg@10", "test/hr@50", "test/ndcg@50", "test/hr@200", "test/mrr"]


def load(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="runs", type=Path)
    ap.add_argument("--best", action="store_true")
    args = ap.parse_args(argv)
    runs = load(args.root)
    if args.best:
        hstu = {name: m for name, m in runs.items() if "hstu" in name}
        print(max(hstu, key=lambda name: hstu[name]["valid_ndcg@10"]) if hstu else "")
        return 0
    width = max([len(n) for n in runs] + [3])
    print(f"| {'run':{width}} | best epoch | valid ndcg@10 | " + " | ".join(c.removeprefix("test/") for c in COLUMNS)
          + " |")
    print(f"|{'-' * (width + 2)}|-----------:|--------------:|" + "|".join("-" * (len(c) - 3) + ":" for c in COLUMNS)
          + "|")
    for name, m in runs.items():
        print(f"| {name:{width}} | {m['best_epoch']:10d} | {m['valid_ndcg@10']:13.4f} | "
              + " | ".join(f"{m[c]:{len(c) - 5}.4f}" for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
