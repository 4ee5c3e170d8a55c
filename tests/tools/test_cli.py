"""``python -m crelu_ext``: help without the extras, one line naming the missing extra,
and files from someone else (checkpoints, CIFAR batches) that cannot run code."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from crelu_ext.paper import analysis, train

# Runs `python -m crelu_ext ...` in a Python where the extras' modules cannot be imported,
# as after a plain `pip install .`: a None in sys.modules makes `import` raise
# ModuleNotFoundError and importlib.util.find_spec answer None, as for a missing module.
WITHOUT_EXTRAS = """
import runpy, sys

sys.modules.update(dict.fromkeys(["tqdm", "sklearn", "matplotlib"]))
sys.argv = ["crelu_ext", *sys.argv[1:]]
runpy.run_module("crelu_ext", run_name="__main__")
"""


def run_without_extras(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT_EXTRAS, *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "analyze", "bench"])
def test_help_works_without_the_extras(command):
    result = run_without_extras(command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"python -m crelu_ext {command}" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "module", "extra"),
    [
        (["train", "--width", "0.125", "--steps", "1"], "sklearn", "train"),
        (["analyze", "--width", "0.125", "--steps", "1", "--out", "{tmp}"], "sklearn", "analysis"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, arguments, module, extra):
    result = run_without_extras(*(a.format(tmp=tmp_path) for a in arguments))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m crelu_ext {arguments[0]} needs {module}, which is not installed: "
        f'pip install "crelu_ext[{extra}]"'
    ]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    # The control: the planted payload does run under a plain pickle.load.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


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
