"""The CUDA kernels' machine code, checked without a GPU.

For every architecture whose SASS the built extension holds, with the
``cuobjdump`` that ships in Triton's wheel:
- every vectorized kernel (``VectorAccess`` in its name, see
  csrc/cuda/crelu_kernels.cuh) has 128-bit global loads and stores
  (``LDG.E.128``, ``STG.E.128``);
- no kernel uses local memory (``LOCAL``/``STACK`` in ``-res-usage``, or
  ``LDL``/``STL`` instructions): a spill in a bandwidth-bound kernel.
It prints each kernel's registers.

    python tools/cuda_codegen.py [path/to/libcrelu_ext_ops.so]   # exits 1 on violations

Other scripts call ``check(so_path=None) -> list[str]`` (the violations; it
prints the table too).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ARCH_HEADER = re.compile(r"^\s*arch = (sm_\d+a?)\s*$")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")


@dataclass
class Kernel:
    arch: str
    name: str  # mangled
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    loads_128: int = 0
    stores_128: int = 0
    local_accesses: int = 0  # LDL and STL instructions

    @property
    def vectorized(self) -> bool:
        return "VectorAccess" in self.name


def find_cuobjdump() -> str:
    spec = importlib.util.find_spec("triton")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(Path(cuda_home) / "bin" / "cuobjdump")
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError(
            "cuda_codegen: no cuobjdump (looked in Triton's wheel, $CUDA_HOME/bin and PATH)"
        )
    return found


def find_extension() -> str:
    """The op library, which holds the CUDA kernels."""
    spec = importlib.util.find_spec("crelu_ext")
    library = Path(spec.origin).parent / "libcrelu_ext_ops.so" if spec and spec.origin else None
    if library is None or not library.exists():
        raise FileNotFoundError("cuda_codegen: crelu_ext's op library is not built")
    return str(library)


def by_arch(cuobjdump: str, flag: str, so_path: str):
    """Yields (arch, line) for cuobjdump's output over every cubin."""
    output = subprocess.run(
        [cuobjdump, flag, so_path], check=True, capture_output=True, text=True
    ).stdout
    arch = None
    for line in output.splitlines():
        header = ARCH_HEADER.match(line)
        if header:
            arch = header.group(1)
        elif arch is not None:
            yield arch, line


def read_kernels(so_path: str) -> list[Kernel]:
    cuobjdump = find_cuobjdump()
    kernels: dict[tuple[str, str], Kernel] = {}
    current = None
    for arch, line in by_arch(cuobjdump, "-res-usage", so_path):
        function = RES_FUNCTION.match(line)
        if function:
            current = kernels.setdefault((arch, function.group(1)), Kernel(arch, function.group(1)))
            continue
        resources = RESOURCES.search(line)
        if resources and current is not None:
            current.registers, current.stack_bytes, current.local_bytes = map(
                int, resources.groups()
            )
            current = None
    for arch, line in by_arch(cuobjdump, "-sass", so_path):
        function = SASS_FUNCTION.match(line)
        if function:
            current = kernels.setdefault((arch, function.group(1)), Kernel(arch, function.group(1)))
        elif current is not None:
            current.loads_128 += " LDG.E.128" in line
            current.stores_128 += " STG.E.128" in line
            current.local_accesses += bool(re.search(r"\b(LDL|STL)\b", line))
    return sorted(kernels.values(), key=lambda k: (k.arch, k.name))


def readable_names(kernels: list[Kernel]) -> dict[str, str]:
    """Mangled name -> the body it runs, e.g. ForwardBody<float, unsigned int,
    VectorAccess>, demangled by c++filt when there is one."""
    names = sorted({k.name for k in kernels})
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {name: name for name in names}
    demangled = subprocess.run(
        [cxxfilt], input="\n".join(names), check=True, capture_output=True, text=True
    ).stdout.splitlines()
    readable = {}
    for name, full in zip(names, demangled, strict=True):
        full = full.replace("crelu_ext::gpu::", "")
        body = re.search(r"crelu_kernel<(\w+<[^<>]*>)", full)
        readable[name] = body.group(1) if body else full
    return readable


def print_table(kernels: list[Kernel]) -> None:
    names = readable_names(kernels)
    width = max(len(n) for n in names.values())
    print(f"{'arch':<7} {'kernel':<{width}} {'regs':>4} {'local':>5} {'LDG.128':>7} {'STG.128':>7}")
    for k in kernels:
        print(
            f"{k.arch:<7} {names[k.name]:<{width}} {k.registers:>4} "
            f"{k.local_bytes + k.stack_bytes:>5} {k.loads_128:>7} {k.stores_128:>7}"
        )


def check(so_path: str | None = None) -> list[str]:
    """The machine-code violations of the CUDA kernels in ``so_path`` (default:
    the importable crelu_ext's libcrelu_ext_ops.so); prints a table of the kernels first."""
    so_path = so_path or find_extension()
    kernels = read_kernels(so_path)
    if not kernels:
        return [f"{so_path}: no CUDA kernels (built without CUDA?)"]
    print_table(kernels)
    violations = []
    for arch in sorted({k.arch for k in kernels}):
        if not any(k.vectorized for k in kernels if k.arch == arch):
            violations.append(f"{arch}: no vectorized kernel found")
    for k in kernels:
        where = f"{k.arch} {k.name}"
        if k.vectorized and k.loads_128 == 0:
            violations.append(f"{where}: vectorized, but no 128-bit global load (LDG.E.128)")
        if k.vectorized and k.stores_128 == 0:
            violations.append(f"{where}: vectorized, but no 128-bit global store (STG.E.128)")
        if k.local_bytes or k.stack_bytes or k.local_accesses:
            violations.append(
                f"{where}: uses local memory ({k.local_bytes} B local, {k.stack_bytes} B "
                f"stack, {k.local_accesses} LDL/STL)"
            )
    return violations


def main() -> int:
    violations = check(sys.argv[1] if len(sys.argv) > 1 else None)
    for violation in violations:
        print(f"VIOLATION: {violation}", file=sys.stderr)
    print(f"cuda_codegen: {'FAILED' if violations else 'ok'}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
