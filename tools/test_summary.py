"""The tests counted over pytest's JUnit XML files (``pytest --junitxml``), as
one plain closing line: ``tests: 1234 passed, 0 failed, 12 skipped``.

    python tools/test_summary.py [--label NAME] [--require-passed] FILE.xml...

A test with an error (in collection, setup or teardown) counts as failed, an
xfailed one as skipped, as pytest's JUnit report has them. Exits 1 when a
file is missing or is not a pytest report, or, with ``--require-passed``, when
no test passed. Standard library only: CI runs it with any Python.
"""

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def count(path: Path) -> dict[str, int]:
    """passed, failed and skipped over the file's test cases. pytest writes a
    test twice when its call fails and its teardown errors; a test is counted
    once, as failed if any of its entries failed or errored."""
    root = ET.parse(path).getroot()
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"<{root.tag}> is not a pytest report")
    outcomes: dict[tuple[str | None, str | None], str] = {}
    for case in root.iter("testcase"):
        key = (case.get("classname"), case.get("name"))
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        if outcomes.get(key) != "failed":
            outcomes[key] = outcome
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in outcomes.values():
        totals[outcome] += 1
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="pytest --junitxml files")
    parser.add_argument("--label", default="tests", help="the line's first word (default: tests)")
    parser.add_argument("--require-passed", action="store_true", help="exit 1 when no test passed")
    args = parser.parse_args(argv)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    problems = []
    for path in args.files:
        try:
            for key, value in count(path).items():
                totals[key] += value
        except (OSError, ET.ParseError, ValueError) as error:
            problems.append(f"{args.label}: no test results in {path}: {error}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(
        f"{args.label}: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    if args.require_passed and totals["passed"] == 0:
        print(f"{args.label}: no test passed", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
