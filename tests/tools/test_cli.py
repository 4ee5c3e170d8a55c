"""``python -m crelu_ext``: help without the extras, one line naming the missing extra,
and files from someone else (checkpoints, CIFAR batches) that cannot run code."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crelu_ext
from crelu_ext import __main__ as cli
from crelu_ext.paper import analysis, train

# The modules of every extra (pyproject.toml: bench, paper), as the CLI names them.
EXTRAS_MODULES = ("numpy", "sklearn", "matplotlib", "tqdm", "pytest_benchmark")

# Runs `python -m crelu_ext ...` in a Python where the modules named in its first
# argument cannot be imported, as after a plain `pip install .` of a torch-only
# environment: the path finder stops finding them, so `import` raises the
# ModuleNotFoundError of a missing module and importlib.util.find_spec answers None.
WITHOUT_MODULES = """
import runpy, sys
from importlib.machinery import PathFinder

hidden = set(sys.argv[1].split(","))


class WithoutHidden(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return super().find_spec(name, path, target)


sys.meta_path = [WithoutHidden if f is PathFinder else f for f in sys.meta_path]
sys.argv = ["crelu_ext", *sys.argv[2:]]
runpy.run_module("crelu_ext", run_name="__main__")
"""


def run_without(modules, *arguments: str, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT_MODULES, ",".join(modules), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def run_without_extras(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    return run_without(EXTRAS_MODULES, *arguments, cwd=cwd)


@pytest.mark.parametrize("command", ["train", "analyze", "bench"])
def test_help_works_without_the_extras(command):
    result = run_without_extras(command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"python -m crelu_ext {command}" in result.stdout
    assert result.stderr == ""  # not even torch's warning of a missing numpy


def test_the_extras_modules_are_hidden_as_if_not_installed():
    # The control for the tests that hide them: each is installed here and hidden there.
    code = """
import importlib.util, json
found = {}
for name in hidden:
    try:
        __import__(name)
    except ModuleNotFoundError as error:
        found[name] = [str(error), importlib.util.find_spec(name)]
print(json.dumps(found))
"""
    code = WITHOUT_MODULES.replace('runpy.run_module("crelu_ext", run_name="__main__")', code)
    command = [sys.executable, "-c", code, ",".join(EXTRAS_MODULES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        name: [f"No module named {name!r}", None] for name in EXTRAS_MODULES
    }


def test_help_lists_each_command_with_what_it_does():
    for flag in ("--help", "-h"):
        result = run_without_extras(flag)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        assert lines[0] == "usage: python -m crelu_ext {bench,train,analyze} [options]"
        for command in ("bench", "train", "analyze"):
            (line,) = [line for line in lines if line.split()[:1] == [command]]
            assert len(line.split()) > 3, line  # a description follows the name
    bare = run_without_extras()
    assert bare.returncode == 2
    assert bare.stdout == ""
    assert bare.stderr.strip() == result.stdout.strip()
    unknown = run_without_extras("fit")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("error: unknown command 'fit'")


# (hidden modules, command line, the module the hint names, its extra): every extra's
# module hidden, then each that a command reaches first when the others are there.
TRAIN = ["train", "--width", "0.125", "--steps", "1"]
ANALYZE = ["analyze", "--width", "0.125", "--steps", "1", "--out", "{tmp}"]
BENCH = ["bench", "--device", "cpu", "--shape", "2,8,4,4", "--reps", "1", "--no-save"]
MISSING_EXTRA_CASES = [
    pytest.param(EXTRAS_MODULES, TRAIN, "numpy", "paper", id="train"),
    pytest.param(["sklearn"], TRAIN, "sklearn", "paper", id="train-sklearn"),
    pytest.param(["tqdm"], TRAIN, "tqdm", "paper", id="train-tqdm"),
    pytest.param(EXTRAS_MODULES, ANALYZE, "numpy", "paper", id="analyze"),
    # Before it trains, not after.
    pytest.param(["matplotlib"], ANALYZE, "matplotlib", "paper", id="analyze-matplotlib"),
    pytest.param(EXTRAS_MODULES, BENCH, "tqdm", "bench", id="bench"),
]


@pytest.mark.parametrize(("hidden", "arguments", "module", "extra"), MISSING_EXTRA_CASES)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, hidden, arguments, module, extra):
    # Run from this source checkout: the package folder has a pyproject.toml beside it.
    checkout = Path(crelu_ext.__file__).resolve().parent.parent
    assert (checkout / "pyproject.toml").is_file()
    result = run_without(hidden, *(a.format(tmp=tmp_path) for a in arguments))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m crelu_ext {arguments[0]} needs {module}, which is not installed: "
        f'pip install --no-build-isolation ".[{extra}]" (run in {checkout})'
    ]


def test_a_missing_extra_of_an_installed_package_names_the_distribution(tmp_path):
    # The package on its own, as pip installs it: no pyproject.toml beside it.
    package = Path(crelu_ext.__file__).resolve().parent
    site = tmp_path / "site"
    shutil.copytree(
        package, site / "crelu_ext", ignore=shutil.ignore_patterns("__pycache__", "_C.*")
    )
    for compiled in package.glob("_C.*"):
        (site / "crelu_ext" / compiled.name).symlink_to(compiled)
    result = run_without_extras("train", "--width", "0.125", "--steps", "1", cwd=site)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "python -m crelu_ext train needs numpy, which is not installed: "
        'pip install "crelu_ext[paper]"'
    ]


def test_an_extra_imported_with_the_commands_module_still_gets_the_hint(
    tmp_path, monkeypatch, capsys
):
    # The commands' modules import no extra when imported (the --help tests keep it so);
    # one that did would still end in the hint, not in a traceback.
    (tmp_path / "eager_command.py").write_text("import sklearn\n\ndef main(argv): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(cli.COMMANDS, "eager", ("eager_command", "paper", "a test command"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eager"])
    assert str(exit_.value).startswith(
        "python -m crelu_ext eager needs sklearn, which is not installed: pip install"
    )


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_train_reads_official_cifar_files(tmp_path):
    # The control for the refusals below: the reader takes well-formed batches.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    _cifar_folder(tmp_path, {b"labels": [0, 1], b"data": pixels})
    metrics = tmp_path / "metrics.json"
    flags = ["--width", "0.125", "--steps", "1", "--batch-size", "2", "--metrics-out", str(metrics)]
    train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), *flags])
    assert json.loads(metrics.read_text())["config"]["dataset"] == "cifar10"


@pytest.fixture
def planted_checkpoint(tmp_path):
    """A checkpoint whose unpickling would create a marker file."""
    path, marker = tmp_path / "shared.pt", tmp_path / "ran"
    torch.save({"step": 1, "runs": [Payload(marker)], "metrics": {}}, path)
    return path, marker


def test_train_refuses_a_checkpoint_that_would_run_code(planted_checkpoint, capsys):
    path, marker = planted_checkpoint
    with pytest.raises(SystemExit):
        train.main(["--width", "0.125", "--steps", "1", "--checkpoint", str(path)])
    assert f"refusing checkpoint {path}" in capsys.readouterr().err
    assert not marker.exists()


def test_analyze_refuses_a_checkpoint_that_would_run_code(planted_checkpoint, tmp_path, capsys):
    path, marker = planted_checkpoint
    with pytest.raises(SystemExit):
        analysis.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert f"refusing checkpoint {path}" in capsys.readouterr().err
    assert not marker.exists()


def test_a_checkpoint_of_other_data_is_refused_clearly(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(SystemExit):
        train.main(["--width", "0.125", "--steps", "1", "--checkpoint", str(path)])
    assert "is not a `python -m crelu_ext train` checkpoint" in capsys.readouterr().err


def _cifar_folder(root, data_batch_1) -> None:
    """The official layout; data_batch_1 holds ``data_batch_1``, the rest are valid."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [0, 1], b"data": np.zeros((2, 3072), np.uint8)}
        with open(folder / name, "wb") as file:
            pickle.dump(data_batch_1 if name == "data_batch_1" else batch, file)


@pytest.mark.parametrize(
    "make_payload",
    [
        lambda marker: {b"labels": [0], b"data": Payload(marker)},
        lambda marker: [np.zeros(2), {b"nested": (Payload(marker),)}],
    ],
    ids=["in-the-dict", "nested"],
)
def test_train_refuses_cifar_files_that_would_run_code(tmp_path, capsys, make_payload):
    marker = tmp_path / "ran"
    _cifar_folder(tmp_path, make_payload(marker))
    with pytest.raises(SystemExit):
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps", "1"])
    error = capsys.readouterr().err
    assert "refusing CIFAR file" in error and "data_batch_1" in error
    assert "posix.system" in error or "nt.system" in error
    assert not marker.exists()


def test_cifar_arrays_of_objects_are_refused(tmp_path, capsys):
    _cifar_folder(tmp_path, {b"labels": [0], b"data": np.array([None, "x"], dtype=object)})
    with pytest.raises(SystemExit):
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps", "1"])
    assert "refusing CIFAR file" in capsys.readouterr().err
