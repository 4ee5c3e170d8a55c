"""Summarizes runs in a bench CSV: for each backend, its fraction of copy
bandwidth and its speedup against torch.compile, case by case.

    python benchmarks/summarize.py benchmarks/results/bench_cuda.csv
    python benchmarks/summarize.py bench_cuda.csv --since 2026-11-29T18:00:00+00:00

Without --since, the latest run only; with it, every run from then on (the GPU
check's fp32, bf16 and small-size runs together). A figure the run judged not to
hold (a noisy row or copy, a busy machine, or a ratio within the rows' bands;
see docs/benchmarks.md) is marked ~, and a busy run says so; rows of older
runs, without those columns, print as they are.
"""

import argparse
import csv
from pathlib import Path

BACKENDS = ("native", "triton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--since", help="ISO 8601 time: rows of the runs from then on")
    args = parser.parse_args()
    with args.csv.open() as f:
        rows = list(csv.DictReader(f))
    since = args.since or max(row["date"] for row in rows)
    # One writer, one format (isoformat, UTC): the strings sort as the times do.
    rows = [row for row in rows if row["date"] >= since and row["provider"] in BACKENDS]
    if not rows:
        raise SystemExit(f"{args.csv}: no native or triton rows since {since}")
    first = rows[0]
    print(f"{first['device']}, since {since}, torch {first['torch']}, triton {first['triton']}")
    busy = sorted({row["date"] for row in rows if row.get("busy") == "True"})
    if busy:
        print(f"UNRELIABLE: the machine was busy in the runs of {', '.join(busy)}")
    print(f"{'case':<52} {'backend':>8} {'copy%':>7} {'vs compile':>10}")
    for row in rows:
        case = f"{row['shape']} {row['layout']} {row['dtype']} {row['direction']}"
        speedup = row["speedup_vs_compile"]
        speedup = f"{float(speedup):.2f}x" if speedup else "-"
        copy = f"{100 * float(row['fraction_of_copy']):.0f}%"
        print(
            f"{case:<52} {row['provider']:>8} {marked(copy, row, 'fraction_of_copy'):>7} "
            f"{marked(speedup, row, 'speedup_vs_compile'):>10}"
        )


def marked(text: str, row: dict, column: str) -> str:
    """``text`` with a ~ before it where the run judged the figure not to hold."""
    return f"~{text}" if row.get(f"{column}_holds") == "False" else text


if __name__ == "__main__":
    main()
