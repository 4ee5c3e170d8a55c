"""Builds crelu_ext._C: the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present (CRELU_EXT_CUDA=0/1 forces the
choice). MAX_JOBS limits the parallel compile jobs, as for any torch extension.

Built without isolation (against the torch it will run with), so the
build-system requirements in pyproject.toml are not installed for it: the
versions of setuptools and torch are checked here instead.
"""

import glob
import os
import platform
import shutil
import sys
from pathlib import Path

import setuptools
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Keep in step with pyproject.toml (build-system.requires, dependencies).
MIN_SETUPTOOLS = (64,)
MIN_TORCH = (2, 11)
LICENSE = "BSD-3-Clause"
# Compiled once per CPU capability with ATen's flags for it; see the file.
CPU_KERNEL = "csrc/cpu/crelu_kernel.cpp"
CPU_CAPABILITY_FLAGS = {"DEFAULT": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_CAPABILITY_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_CAPABILITY_FLAGS["AVX512"] = [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    ]  # fmt: skip


def release(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0+cu130"."""
    parts = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def check_build_requirements():
    """Fails early, naming the fix, where pip's no-isolation build would fail
    later and less clearly."""
    if release(setuptools.__version__) < MIN_SETUPTOOLS:
        sys.exit(
            f"crelu_ext needs setuptools>={'.'.join(map(str, MIN_SETUPTOOLS))} to build, "
            f"found {setuptools.__version__}: pip install -U setuptools"
        )
    if release(setuptools.__version__) < (70, 1):
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
    if release(torch.__version__) < MIN_TORCH:
        sys.exit(
            f"crelu_ext needs torch>={'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}"
        )


def license_metadata():
    """The license, in the form this setuptools takes: an SPDX expression from
    77 on (PEP 639), the older License field before (a fresh venv has 65.5)."""
    if release(setuptools.__version__) >= (77,):
        return {"license_expression": LICENSE}
    return {"license": LICENSE}


def find_cuda_home():
    """The toolkit root. It must be set before torch.utils.cpp_extension is
    imported, which otherwise derives it from the `nvcc` on PATH: here that is
    a wrapper in /usr/local/bin, and /usr/local is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def wants_cuda(cuda_home):
    import torch

    forced = os.environ.get("CRELU_EXT_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            sys.exit(f"CRELU_EXT_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (cuda_home is None or torch.version.cuda is None):
            sys.exit(
                "CRELU_EXT_CUDA=1, but "
                + (
                    "no CUDA toolkit was found (set CUDA_HOME)"
                    if cuda_home is None
                    else "this torch is a CPU-only build"
                )
            )
        return forced == "1"
    return cuda_home is not None and torch.version.cuda is not None


def pip_cuda_include_dirs():
    """Headers that ATen's CUDA headers need but that the pip `nvidia-*`
    packages hold rather than the toolkit (cusparse.h is in nvidia/cu13/include)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))]


def extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = wants_cuda(cuda_home)
    sources = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if p != ROOT / CPU_KERNEL
    )
    # The stable ABI needs only PyInit__C, so one wheel serves every Python >= 3.9.
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    # ATen's parallel_for runs its OpenMP loop only in code built with -fopenmp;
    # without it every kernel silently runs on one thread.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-fdiagnostics-color=always"]}
    extra_link_args = ["-fopenmp"]
    if not with_cuda:
        return CppExtension(
            "crelu_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "crelu_ext._C",
        sources,
        include_dirs=pip_cuda_include_dirs(),
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        py_limited_api=True,
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionPerCpuCapability(BuildExtension):
        """torch's BuildExtension, plus the CPU kernel compiled once per
        capability: setuptools has no per-file flags, so those objects are
        compiled here, with the extension's own flags and the capability's."""

        def build_extension(self, ext):
            for capability, isa_flags in CPU_CAPABILITY_FLAGS.items():
                ext.extra_objects += self.compiler.compile(
                    [CPU_KERNEL],
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    macros=[*ext.define_macros, ("CPU_CAPABILITY", capability),
                            (f"CPU_CAPABILITY_{capability}", None)],
                    include_dirs=ext.include_dirs,
                    extra_postargs=ext.extra_compile_args["cxx"] + isa_flags,
                )  # fmt: skip
            super().build_extension(ext)

    return BuildExtensionPerCpuCapability.with_options(use_ninja=True)


def main():
    check_build_requirements()
    setup(
        **license_metadata(),
        ext_modules=[extension()],
        cmdclass={"build_ext": build_ext_class()},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )


main()
