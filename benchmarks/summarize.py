"""Summarizes the latest run in a bench CSV: for each backend, its fraction of
copy bandwidth and its speedup against torch.compile, case by case.

    python benchmarks/summarize.py benchmarks/results/bench_cuda.csv
"""

import csv
import sys
from pathlib import Path

BACKENDS = ("native", "triton")


def main(path: Path) -> None:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    latest = max(row["date"] for row in rows)
    rows = [row for row in rows if row["date"] == latest and row["provider"] in BACKENDS]
    print(f"{rows[0]['device']}, {latest}, torch {rows[0]['torch']}, triton {rows[0]['triton']}")
    print(f"{'case':<52} {'backend':>8} {'copy%':>6} {'vs compile':>10}")
    for row in rows:
        case = f"{row['shape']} {row['layout']} {row['dtype']} {row['direction']}"
        speedup = row["speedup_vs_compile"]
        speedup = f"{float(speedup):.2f}x" if speedup else "-"
        print(
            f"{case:<52} {row['provider']:>8} "
            f"{100 * float(row['fraction_of_copy']):5.0f}% {speedup:>10}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
