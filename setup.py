"""Builds crelu_ext's compiled part with CMake (CMakeLists.txt holds every
source list, flag and discovery rule): the op library libcrelu_ext_ops.so and
the Python module crelu_ext._C next to it in the package, and with
CRELU_EXT_TESTING=1 (a test build) the CUDA kernels' host emulator
(crelu_ext/testing/) and the C++ tests, which ctest runs in the CMake build
folder (CRELU_EXT_BUILD_DIR, default build/cmake-<python>-<hash>).

CRELU_EXT_CUDA=0/1 forces the CUDA kernels off/on (default: built when a CUDA
toolkit and a CUDA build of torch are present). MAX_JOBS limits the parallel
compile jobs, as for any torch extension.

Built without isolation (against the torch it will run with), so the
build-system requirements in pyproject.toml are not installed for it: they are
checked here instead.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:
    sys.exit("crelu_ext needs the packaging module to build: pip install packaging")
import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
# Keep in step with pyproject.toml (build-system.requires, dependencies).
MIN_SETUPTOOLS = Version("64")
MIN_TORCH = Version("2.11")
MIN_CMAKE = Version("3.22")
SETUPTOOLS_WITH_BDIST_WHEEL = Version("70.1")  # before it, the wheel package's
SETUPTOOLS_WITH_PEP639 = Version("77")
LICENSE = "BSD-3-Clause"
LICENSE_FILE = "LICENSE"
SETUPTOOLS = Version(setuptools.__version__)


def find_tool(name: str, package: str, bin_dir: str) -> str | None:
    """The pip package's executable (``package.<bin_dir>/<name>``), else the one on PATH."""
    try:
        module = __import__(package)
    except ImportError:
        module = None
    candidate = os.path.join(getattr(module, bin_dir, ""), name)
    if module is not None and os.path.exists(candidate):
        return candidate
    return shutil.which(name)


def find_cmake() -> str:
    found = find_tool("cmake", "cmake", "CMAKE_BIN_DIR")
    if found is None:
        sys.exit(f"crelu_ext builds with CMake>={MIN_CMAKE}, found none: pip install cmake")
    return found


def check_build_requirements(cmake: str) -> None:
    """Fails early, naming the fix, where pip's no-isolation build would fail
    later and less clearly."""
    if SETUPTOOLS < MIN_SETUPTOOLS:
        sys.exit(
            f"crelu_ext needs setuptools>={MIN_SETUPTOOLS} to build, "
            f"found {setuptools.__version__}: pip install -U setuptools"
        )
    if SETUPTOOLS < SETUPTOOLS_WITH_BDIST_WHEEL:
        try:
            import wheel  # noqa: F401  (setuptools gained its own bdist_wheel in 70.1)
        except ImportError:
            sys.exit(
                f"crelu_ext: setuptools {setuptools.__version__} builds wheels (editable "
                "installs too) only with the wheel package: pip install wheel"
            )
    try:
        import torch
    except ImportError:
        sys.exit(
            "crelu_ext compiles against the torch it will run with: install torch first "
            "(pip install torch), then pip install --no-build-isolation ."
        )
    if Version(torch.__version__).release < MIN_TORCH.release:
        sys.exit(f"crelu_ext needs torch>={MIN_TORCH}, found {torch.__version__}")
    output = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+(\.\d+)*)", output)
    if found is None or Version(found.group(1)) < MIN_CMAKE:
        sys.exit(
            f"crelu_ext builds with CMake>={MIN_CMAKE}, {cmake} is "
            f"{found.group(1) if found else 'not working'}: pip install cmake"
        )


def license_metadata():
    """The license, in the form this setuptools takes: an SPDX expression from
    77 on (PEP 639), the older License field before (a fresh venv has 65.5);
    its text, LICENSE, goes into the wheel's metadata (and, by MANIFEST.in, the
    sdist) with either."""
    if SETUPTOOLS >= SETUPTOOLS_WITH_PEP639:
        return {"license_expression": LICENSE, "license_files": [LICENSE_FILE]}
    return {"license": LICENSE, "license_files": [LICENSE_FILE]}


def env_switch(name: str, on: str, off: str, unset: str) -> str:
    value = os.environ.get(name)
    if value is None:
        return unset
    if value not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return on if value == "1" else off


class CMakeBuild(build_ext):
    """Configures, builds and installs CMakeLists.txt's `python` component
    into the folder that holds the crelu_ext package: the source tree for an
    editable install, build_lib for a wheel."""

    def run(self):
        import torch

        cmake = find_cmake()
        check_build_requirements(cmake)
        # Kept between builds (editable installs build in a fresh temporary
        # folder otherwise), one per Python and torch: CMake caches what it
        # found for them. CRELU_EXT_BUILD_DIR names it instead (the Makefile
        # runs the C++ tests of a test build there).
        key = hashlib.sha256(f"{sys.executable}\n{torch.__file__}".encode()).hexdigest()[:12]
        default_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{key}"
        build_dir = Path(os.environ.get("CRELU_EXT_BUILD_DIR") or default_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        testing = env_switch("CRELU_EXT_TESTING", "ON", "OFF", "OFF")
        editable = self.inplace or getattr(self, "editable_mode", False)
        prefix = ROOT if editable else Path(self.build_lib).resolve()
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            # torch is found as a libtorch user's build finds it (CMakeLists.txt
            # asks this Python), so the Python build tests that path too.
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCRELU_EXT_CUDA={env_switch('CRELU_EXT_CUDA', 'ON', 'OFF', 'AUTO')}",
            # A test build: the emulator and the C++ tests (ctest in build_dir).
            f"-DCRELU_EXT_TESTING={testing}",
            "-DCRELU_EXT_PYTHON=ON",
            f"-DBUILD_TESTING={testing}",
        ]
        ninja = find_tool("ninja", "ninja", "BIN_DIR")
        if ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        # What an older build left there (the emulator of a test build, say).
        package = prefix / "crelu_ext"
        for stale in [*package.glob("_C.*"), *package.glob("**/libcrelu_ext_*.so")]:
            stale.unlink()
        subprocess.run(
            [cmake, "--install", str(build_dir), "--component", "python", "--prefix", str(prefix)],
            check=True,
        )


def main():
    setup(
        **license_metadata(),
        # What CMake builds; setuptools only learns that the wheel is per platform.
        ext_modules=[Extension("crelu_ext._C", sources=[])],
        cmdclass={"build_ext": CMakeBuild},
    )


main()
