"""The package as built and installed: native kernels present where CI
requires them, and a clean import without the compiled part."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

import crelu_ext
from crelu_ext import _native as ops
from crelu_ext.testing import emulated


@pytest.mark.skipif(
    os.environ.get("CRELU_EXT_REQUIRE_NATIVE") != "1",
    reason="set CRELU_EXT_REQUIRE_NATIVE=1 to require the compiled kernels (CI does)",
)
def test_native_kernels_are_built():
    assert ops.NATIVE_IMPORT_ERROR is None, ops.NATIVE_IMPORT_ERROR
    assert crelu_ext.available_backends("cpu")[0] == "native"
    if torch.cuda.is_available() or os.environ.get("CRELU_EXT_CUDA") == "1":
        assert torch._C._dispatch_has_kernel_for_dispatch_key("crelu_ext::crelu", "CUDA")
    # The op library lies next to the Python module, which finds it there.
    assert (ops.PACKAGE_DIR / "libcrelu_ext_ops.so").exists()
    assert Path(ops._C.__file__).name == "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def test_the_op_library_registers_no_test_op():
    # The emulator's ops come with its own library, which only
    # crelu_ext.testing.emulated loads.
    code = """
import torch, crelu_ext
assert crelu_ext._native.NATIVE_IMPORT_ERROR is None, crelu_ext._native.NATIVE_IMPORT_ERROR
for name in ("emulated_crelu", "emulated64_crelu", "emulated_launch_plan"):
    assert not hasattr(torch.ops.crelu_ext, name), name
print("ok")
"""
    if ops.NATIVE_IMPORT_ERROR is not None:
        pytest.skip(f"crelu_ext._C is not built: {ops.NATIVE_IMPORT_ERROR}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_build_without_the_emulator_says_how_to_get_it(monkeypatch, tmp_path):
    if ops.NATIVE_IMPORT_ERROR is not None:
        pytest.skip(f"crelu_ext._C is not built: {ops.NATIVE_IMPORT_ERROR}")
    monkeypatch.setattr(emulated, "LIBRARY", tmp_path / "libcrelu_ext_emulator.so")
    reason = emulated._load()
    assert "no emulator" in reason and "CRELU_EXT_TESTING=1" in reason, reason


def test_imports_and_falls_back_without_the_compiled_part():
    # Hide crelu_ext._C as if the build had been skipped.
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "crelu_ext._C":
            raise ImportError("hidden by the test")
sys.meta_path.insert(0, Hide())
import torch, crelu_ext
assert crelu_ext.available_backends("cpu") == ["reference"], crelu_ext.available_backends()
x = torch.randn(2, 3)
assert torch.equal(crelu_ext.crelu(x), crelu_ext.reference.crelu(x))
try:
    crelu_ext.crelu(x, backend="native")
except RuntimeError as e:
    assert "did not load" in str(e) and "hidden by the test" in str(e), e
else:
    raise AssertionError("native should be unavailable")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_imports_without_numpy_and_says_nothing_of_it():
    # numpy is no dependency: an install with torch alone imports and runs without a
    # word about it (torch 2.14 itself warns "Failed to initialize NumPy" on import).
    # The path finder stops finding numpy: `import numpy` fails as where it is not
    # installed, and importlib.util.find_spec answers None.
    code = """
import sys
from importlib.machinery import PathFinder

class WithoutNumpy(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "numpy":
            return None
        return super().find_spec(name, path, target)

sys.meta_path = [WithoutNumpy if f is PathFinder else f for f in sys.meta_path]
import crelu_ext, torch
x = torch.randn(2, 3)
assert torch.equal(crelu_ext.crelu(x), crelu_ext.CReLU()(x))
try:
    import numpy
except ModuleNotFoundError:
    print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "NumPy" not in result.stderr, result.stderr


def test_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch, crelu_ext
assert "triton" not in crelu_ext.available_backends("cpu")
try:
    crelu_ext.crelu(torch.randn(2, 3), backend="triton")
except RuntimeError as e:
    assert "triton did not import" in str(e), e
else:
    raise AssertionError("triton should be unavailable")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def run_from_source_copy(tmp_path, installed_build: bool) -> subprocess.CompletedProcess:
    """Imports a copy of the package that has no compiled part, as from a source
    checkout never built in place; with ``installed_build``, a built copy is
    also installed (further down sys.path)."""
    source = tmp_path / "checkout"
    shutil.copytree(
        Path(crelu_ext.__file__).parent,
        source / "crelu_ext",
        ignore=shutil.ignore_patterns("_C*", "libcrelu_ext_*"),
    )
    path = [str(source)]
    if installed_build:
        site = tmp_path / "site-packages" / "crelu_ext"
        site.mkdir(parents=True)
        (site / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).touch()
        path.append(str(site.parent))
    # An editable install of another checkout (as in a development venv) would
    # lend that checkout's _C to the copy: its import hook is taken out.
    code = """
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f)]
import torch, crelu_ext
assert crelu_ext.available_backends("cpu")[0] != "native", crelu_ext._native.__file__
try:
    crelu_ext.crelu(torch.randn(2, 3), backend="native")
except RuntimeError as e:
    print(e)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=source, env=env
    )


@pytest.mark.parametrize("installed_build", [False, True], ids=["never-built", "shadowing"])
def test_missing_compiled_part_says_how_to_fix_it(tmp_path, installed_build):
    result = run_from_source_copy(tmp_path, installed_build)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "backend 'native' is not available" in message
    assert "no compiled part" in message and "pip install -e ." in message
    assert "circular" not in message
    # The package these tests run may itself be a built copy installed in the venv
    # (make test-oldest's), which the copy's message then names too.
    installed_in_venv = not (Path(crelu_ext.__file__).parents[1] / "pyproject.toml").exists()
    assert "outside the checkout" in message
    assert ("installed at" in message) == (installed_build or installed_in_venv), message


def test_the_license_ships_in_the_sdist_and_the_wheels_metadata(tmp_path):
    # What tools/release_check.sh checks of the built wheel, without compiling: the
    # sdist, and the .dist-info that setuptools puts in the wheel.
    root = Path(__file__).resolve().parents[2]
    try:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    source = tmp_path / "src"
    for name in files:
        if (root / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, source / name)
    code = """
import sys
from setuptools import build_meta
out = sys.argv[1]  # build_meta rewrites sys.argv
names = build_meta.build_sdist(out), build_meta.prepare_metadata_for_build_wheel(out)
print(*names)
"""
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sdist, dist_info = result.stdout.splitlines()[-1].split()
    text = (root / "LICENSE").read_text()
    assert "BSD 3-Clause License" in text and "the crelu_ext authors" in text
    with tarfile.open(out / sdist) as archive:
        assert (
            archive.extractfile(f"{sdist.removesuffix('.tar.gz')}/LICENSE").read().decode() == text
        )
    licenses = [out / dist_info / "licenses" / "LICENSE", out / dist_info / "LICENSE"]
    assert any(path.is_file() and path.read_text() == text for path in licenses), licenses
