"""Every Python example of the README and of docs/ runs as it stands, each in a fresh
interpreter in an empty folder, so that none leans on another's names or files, and
leaves that folder as it found it. Each runs from a file of its own, as users run their
code: crelu_ext.fuse reads the source of the forwards it rewrites.

An example that needs an optional module or a GPU says so in its first line,
``# requires: onnx, onnxruntime`` (module names, or ``cuda``); it is skipped only where
one of those is missing.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crelu_ext

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
REQUIRES = re.compile(r"# requires: *(.+)")
# AOTInductor's example compiles C++: about a minute and a half on a loaded 2-core VM.
TIMEOUT_S = 600
README_MAX_LINES = 300


def examples() -> list:
    found = []
    for page in PAGES:
        if not page.exists():
            continue
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            found.append(pytest.param(match.group(1), id=name))
    return found


def missing(code: str) -> list[str]:
    """What the example's ``# requires:`` line names that this machine lacks."""
    first = code.partition("\n")[0]
    match = REQUIRES.fullmatch(first.strip())
    if match is None:
        return []
    needs = [name.strip() for name in match.group(1).split(",")]
    return [
        name
        for name in needs
        if not (torch.cuda.is_available() if name == "cuda" else importlib.util.find_spec(name))
    ]


@pytest.mark.parametrize("code", examples())
def test_example_runs_on_its_own(code, tmp_path):
    lacking = missing(code)
    if lacking:
        pytest.skip(f"this machine lacks {', '.join(lacking)}")
    env = dict(os.environ)
    env.pop("CRELU_EXT_BACKEND", None)  # the examples describe the default choice
    # The crelu_ext these tests import, whether a checkout or an installed package.
    package_root = str(Path(crelu_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    script, folder = tmp_path / "example.py", tmp_path / "run"
    script.write_text(code)
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    # Run in a checkout, an example must not leave files there (exports go to a
    # temporary folder).
    left = sorted(path.name for path in folder.iterdir())
    assert not left, f"the example left {left} in the folder it ran in"


def test_readme_has_examples():
    names = {param.id.partition(":")[0] for param in examples()}
    assert "README.md" in names


def test_requires_line_is_read():
    assert missing("# requires: cuda, os\nimport os\n") == (
        [] if torch.cuda.is_available() else ["cuda"]
    )
    assert missing("# requires: no_such_module_crelu\n") == ["no_such_module_crelu"]
    assert missing("import torch\n# requires: no_such_module_crelu\n") == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_links_between_pages_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    pages = [*PAGES, *sorted((ROOT / "benchmarks" / "results").glob("**/README.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        if page.exists()
        for target in link.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, broken


# A path in the checkout as the docs, docstrings and comments name one: not part of a
# longer path (torch/csrc/..., include/crelu_ext/...), ending in a source or page suffix.
NAMED_FILE = re.compile(
    r"(?<![\w/.-])(?:benchmarks|crelu_ext|csrc|docs|tests|tools)/[\w./-]*?"
    r"\.(?:py|md|sh|cpp|cu|cuh|h|txt)\b"
)

TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".cpp", ".cu", ".cuh", ".h", ".in", ".toml")


def test_files_named_in_the_checkout_exist():
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = [name for name in listed if name.endswith(TEXT_SUFFIXES) or not Path(name).suffix]
    missing = [
        f"{name}: {path}"
        for name in texts
        if (ROOT / name).is_file()
        for path in NAMED_FILE.findall((ROOT / name).read_text(errors="replace"))
        if not (ROOT / path).exists()
    ]
    assert not missing, missing


def test_each_checkpoint_analyze_reads_is_written_by_a_train_command_before_it():
    command = re.compile(r"python -m crelu_ext (train|analyze)\b([^\n`]*)")
    pages = [*PAGES, ROOT / "crelu_ext" / "paper" / "analysis.py"]
    read = []
    for page in pages:
        written = set()
        for name, flags in command.findall(page.read_text()):
            path = re.search(r"--checkpoint ([\w./-]+)", flags)
            if path is None:
                continue
            if name == "train":
                written.add(path.group(1))
            else:
                read.append(path.group(1))
                assert path.group(1) in written, f"{page.name}: no train writes {path.group(1)}"
    assert read  # the check found the pages' analyze commands
