"""tools/gpu_check.sh where there is no GPU: it stops at once, saying why; its steps run
in an environment of its own; its results stay out of the tracked tree; and the test
that ties the emulator to the GPU is collected, skipped by nothing but a missing GPU.
(The dry run, `make gpu-check-dry-run`, runs every step's command on the CPU in CI.)"""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
EMULATOR_VS_GPU = ROOT / "tools" / "emulator_vs_gpu.py"

# What a user may have set that would change the steps, with values that would.
CALLERS_ENVIRONMENT = {
    "CRELU_EXT_BACKEND": "reference",
    "CRELU_EXT_CUDA": "0",
    "CRELU_EXT_TESTING": "0",
    "CRELU_EXT_REQUIRE_NATIVE": "0",
    "TRITON_INTERPRET": "1",
    "PYTEST_ADDOPTS": "-k nothing",
    "PYTEST_PLUGINS": "no_such_plugin",
    "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",
    "CUDA_LAUNCH_BLOCKING": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "backend:no_such_backend",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("nvidia_smi", [False, True], ids=["no-nvidia-smi", "nvidia-smi"])
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path, nvidia_smi):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi:  # a driver's tool that lists a GPU torch cannot use
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Test GPU (UUID: x)'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = [str(bin_dir)] + [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if not (Path(entry) / "nvidia-smi").exists()
    ]
    out = tmp_path / "out"
    env = {
        **os.environ,
        **CALLERS_ENVIRONMENT,
        "PATH": os.pathsep.join(path),
        "PYTHON": sys.executable,
        "OUT": str(out),
    }
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300
    )
    took = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"gpu_check: no usable CUDA GPU: torch {torch.__version__}")
    assert "sees no CUDA device" in line or "built without CUDA" in line
    smi = "nvidia-smi lists GPU 0: Test GPU" if nvidia_smi else "no nvidia-smi on PATH"
    assert smi in line
    assert line.endswith("nothing was run (--dry-run runs the steps' commands on the CPU)")
    assert not out.exists()  # nothing written
    assert took < 60, f"took {took:.0f} s"


@pytest.mark.parametrize("dry_run", [0, 1], ids=["gpu", "dry-run"])
def test_the_steps_run_in_an_environment_of_their_own(dry_run):
    # Sourced, the script defines its functions and runs nothing.
    code = f'source "{SCRIPT}" && gpu_check_environment {dry_run} && env'
    env = {**os.environ, **CALLERS_ENVIRONMENT}
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    build = {"CRELU_EXT_CUDA": "1", "CRELU_EXT_TESTING": "1"}
    for name in CALLERS_ENVIRONMENT:
        # The GPU run builds the emulator, and conftest.py then requires it; the dry run
        # collects against the build that is there.
        assert found.get(name) == (build.get(name) if not dry_run else None), name


def test_the_results_folders_are_ignored_by_git():
    defaults = re.findall(r"OUT=\$\{OUT:-([^}]+)\}", SCRIPT.read_text())
    assert sorted(defaults) == ["build/gpu_check", "build/gpu_check_dry_run"]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for folder in defaults:
        summary = f"{folder}/gpu_check_summary.txt"
        ignored = subprocess.run(["git", "check-ignore", "-q", summary], cwd=ROOT)
        assert ignored.returncode == 0, f"{summary} is not ignored by git"


def _emulator_vs_gpu(*arguments: str, before: str = "") -> subprocess.CompletedProcess:
    """tools/emulator_vs_gpu.py, after ``before`` (code that changes the process)."""
    code = (
        f"{before}\nimport runpy, sys\nsys.argv = ['emulator_vs_gpu.py', *{list(arguments)!r}]\n"
        f"runpy.run_path({str(EMULATOR_VS_GPU)!r}, run_name='__main__')"
    )
    # Neither the build flags nor a Triton interpreter are set for it.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CRELU_EXT_CUDA", "CRELU_EXT_TESTING", "TRITON_INTERPRET", "PYTEST_ADDOPTS")
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_emulator_vs_gpu_test_is_collected_and_skipped_here_for_the_gpu_alone():
    result = _emulator_vs_gpu("--collect-only")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        "emulator-vs-gpu: 12 tests collected, skipped only without a GPU (skipped here: no GPU)"
    )
    # Run, every case skips here: that fails the GPU check's step, as it would on a GPU.
    result = _emulator_vs_gpu()
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "emulator-vs-gpu: 0 passed of 12 tests: FAILED"


def test_with_a_gpu_the_emulator_vs_gpu_test_runs_whatever_the_build():
    # As on a GPU machine whose build lacks the emulator (no CRELU_EXT_TESTING=1): the
    # cases are still not skipped (they would fail, naming the missing emulator).
    simulated = """
import torch
torch.cuda.is_available = lambda: True
import crelu_ext.testing.emulated as emulated
emulated.AVAILABLE, emulated.UNAVAILABLE_REASON = False, "a build without CRELU_EXT_TESTING=1"
"""
    result = _emulator_vs_gpu("--collect-only", before=simulated)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        "emulator-vs-gpu: 12 tests collected, skipped only without a GPU (run here)"
    )


def test_a_skip_for_anything_but_the_gpu_is_found():
    spec = importlib.util.spec_from_file_location("emulator_vs_gpu", EMULATOR_VS_GPU)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    class Item:
        def __init__(self, *marks):
            self.marks = [mark.mark for mark in marks]

        def iter_markers(self, name):
            return [mark for mark in self.marks if mark.name == name]

    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    assert tool.skip_problems(Item(pytest.mark.cuda, no_gpu)) == []
    no_emulator = pytest.mark.skipif(True, reason="no emulated CUDA kernels")
    assert tool.skip_problems(Item(no_gpu, no_emulator)) == [
        "skipif(True, reason='no emulated CUDA kernels')"
    ]
    assert tool.skip_problems(Item(pytest.mark.skip(reason="later"))) == ["a skip mark"]
