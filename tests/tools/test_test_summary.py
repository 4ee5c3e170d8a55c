"""tools/test_summary.py: the count over pytest's JUnit XML, as make test and CI print it."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "tools" / "test_summary.py"

# Every outcome, as pytest writes it: a failing call whose teardown errors is
# two entries of one test, a collection skip is an entry named after the module.
TESTS = """
import pytest

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown")

def test_passes(): pass
def test_passes_too(): pass
def test_fails(): assert False
def test_skips(): pytest.skip("lacks X")
@pytest.mark.xfail
def test_xfails(): assert False
def test_teardown_errors(bad_teardown): pass
def test_fails_and_teardown_errors(bad_teardown): assert False
"""


def summary(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture
def report(tmp_path):
    (tmp_path / "test_outcomes.py").write_text(TESTS)
    (tmp_path / "test_module_skip.py").write_text(
        'import pytest\npytest.skip("no GPU", allow_module_level=True)\n'
    )
    path = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={path}"],
        cwd=tmp_path,
        capture_output=True,
    )
    return path


def test_counts_each_test_once(report):
    result = summary(report)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tests: 2 passed, 3 failed, 3 skipped\n"


def test_adds_files_up_under_a_label(report):
    result = summary("--label", "ci", report, report)
    assert result.stdout == "ci: 4 passed, 6 failed, 6 skipped\n"


def test_a_missing_or_foreign_file_fails(tmp_path, report):
    (tmp_path / "other.xml").write_text("<coverage/>")
    for path in (tmp_path / "missing.xml", tmp_path / "other.xml"):
        result = summary(report, path)
        assert result.returncode == 1
        assert f"no test results in {path}" in result.stderr
        assert result.stdout == "tests: 2 passed, 3 failed, 3 skipped\n"


def test_require_passed(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_text(
        textwrap.dedent("""\
            <?xml version="1.0" encoding="utf-8"?>
            <testsuites><testsuite name="pytest" errors="0" failures="0" skipped="0" tests="0"/>
            </testsuites>""")
    )
    assert summary(empty).returncode == 0
    result = summary("--require-passed", empty)
    assert result.returncode == 1
    assert result.stdout == "tests: 0 passed, 0 failed, 0 skipped\n"
    assert "no test passed" in result.stderr
