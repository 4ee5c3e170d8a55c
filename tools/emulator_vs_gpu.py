"""The one test that ties the CUDA kernels' host emulator to the GPU,
tests/ops/test_cuda.py::test_the_gpu_gives_the_emulators_bytes, for tools/gpu_check.sh:

    python tools/emulator_vs_gpu.py                  on a GPU: runs its cases; each must pass
    python tools/emulator_vs_gpu.py --collect-only   anywhere (the dry run): its cases must be
                                                     collected, carry the marks the GPU check
                                                     selects by, and be skipped by nothing but
                                                     a missing GPU

Either way a case that is skipped on a GPU, or not collected at all, fails the check: a
test that ties the emulator to the GPU and always skips checks nothing. Exits 1 with the
reason; the last line counts the cases.
"""

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/ops/test_cuda.py::test_the_gpu_gives_the_emulators_bytes"
NO_GPU = "no CUDA device"  # test_cuda.py's skip for a machine without a GPU


class Cases:
    """A pytest plugin that keeps the test's collected cases and their outcomes."""

    def __init__(self) -> None:
        self.items: list[pytest.Item] = []
        self.outcomes: dict[str, str] = {}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A case's outcome: its call's, or a failed or skipped setup or teardown.
        kept = self.outcomes.get(report.nodeid) == "failed"
        if (report.when == "call" or report.outcome != "passed") and not kept:
            self.outcomes[report.nodeid] = report.outcome


def skip_problems(item: pytest.Item) -> list[str]:
    """What could skip ``item`` other than a missing GPU: any skip or xfail mark, and
    any skipif but test_cuda.py's, whose condition is that torch sees no GPU."""
    problems = [
        f"a {mark.name} mark" for name in ("skip", "xfail") for mark in item.iter_markers(name)
    ]
    for mark in item.iter_markers("skipif"):
        conditions = list(mark.args) or [mark.kwargs.get("condition")]
        reason = mark.kwargs.get("reason", "")
        if reason != NO_GPU or conditions != [not torch.cuda.is_available()]:
            problems.append(f"skipif({', '.join(map(repr, conditions))}, reason={reason!r})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect-only", action="store_true", help="collect and check, run none")
    args = parser.parse_args(argv)
    # The checkout's crelu_ext, as `python -m pytest` run in it imports.
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    cases = Cases()
    flags = ["-q", "-p", "no:cacheprovider", "-rfEs"]
    status = pytest.main(
        [TEST, *flags, *(["--collect-only"] if args.collect_only else [])], [cases]
    )
    if not cases.items:
        print(f"emulator-vs-gpu: {TEST} collected no case (pytest exit {int(status)})")
        return 1
    problems = []
    for item in cases.items:
        marks = {mark.name for mark in item.iter_markers()}
        if "cuda" not in marks or "large" in marks:  # the parity step's -m "cuda and not large"
            problems.append(f"{item.nodeid}: marks {sorted(marks)}, not cuda without large")
        problems += [f"{item.nodeid}: {problem}" for problem in skip_problems(item)]
    gpu = torch.cuda.is_available()
    if args.collect_only:
        where = "skipped here: no GPU" if not gpu else "run here"
        summary = f"{len(cases.items)} tests collected, skipped only without a GPU ({where})"
    else:
        if not gpu:
            problems.append(f"torch sees no GPU: every case is skipped ({NO_GPU})")
        problems += [
            f"{item.nodeid}: {cases.outcomes.get(item.nodeid, 'not run')}"
            for item in cases.items
            if cases.outcomes.get(item.nodeid) != "passed"
        ]
        summary = f"{sum(o == 'passed' for o in cases.outcomes.values())} passed"
        summary += f" of {len(cases.items)} tests"
    for problem in problems:
        print(f"emulator-vs-gpu: {problem}")
    print(f"emulator-vs-gpu: {summary}{'' if not problems else ': FAILED'}")
    return 1 if problems or status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
