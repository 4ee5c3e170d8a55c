"""Checks the machine code of the Triton kernels without a GPU.

Compiles every kernel of crelu_ext/triton/ops.py for sm_90 and sm_80,
for each dtype and each path the launcher picks (``plan_grid``): aligned
(128-bit access), scalar (misaligned pointers or rows that are not whole
vectors) and wide (rows of 2**31 elements or more). It then asserts, from
the PTX and the SASS:

- no per-element division: at most one 64-bit div/rem (the program's row,
  with its 32-bit fast path), no helper calls;
- on the aligned path, every access of x, the output halves and the
  gradients is 128 bits wide; anything narrower is a mask word;
- no local memory (spills or stack).

It prints the instruction counts per thread and exits non-zero on a
violation. When tools/cuda_codegen.py exists and crelu_ext's op library has
CUDA kernels, their SASS check runs too.

    python tools/codegen_check.py [--arch 90 80]
"""

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import path_to_cuobjdump

from crelu_ext import _native as ops
from crelu_ext.triton import ops as triton_kernels

TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
VECTOR_BITS = 128
THREADS = 32 * triton_kernels.NUM_WARPS


class Kernel(NamedTuple):
    name: str
    fn: object
    pointers: int  # leading arguments: the data pointers and the mask words
    loads: int  # data arrays read
    stores: int  # data arrays written
    constexprs: dict


KERNELS = [
    Kernel("forward", triton_kernels._crelu_forward_kernel, 3, 1, 2, {"WRITE_MASK": False}),
    Kernel("forward+mask", triton_kernels._crelu_forward_kernel, 3, 1, 2, {"WRITE_MASK": True}),
    Kernel("backward", triton_kernels._crelu_backward_kernel, 3, 2, 1, {}),
    Kernel("double backward", triton_kernels._crelu_backward_backward_kernel, 3, 1, 2, {}),
]

# (path, numel, inner): shapes that take each path, all pointers aligned (a
# misaligned one takes the scalar path too). The integers are compiled without
# Triton's multiple-of-16 specialization, the least the JIT may give, so the
# aligned path must vectorize from the launcher's hints alone.
PATHS = [
    ("aligned", 200 * 24, 200),  # rows of whole vectors, for every dtype
    ("scalar", 100 * 37, 37),
    ("wide", 3 * 2**31, 2**31),
]


def compile_kernel(kernel: Kernel, dtype: torch.dtype, path, arch: int):
    _, numel, inner = path
    plan = triton_kernels.plan_grid(numel, inner, dtype.itemsize, aligned=True)
    names = kernel.fn.arg_names
    ints = {
        "numel": numel,
        "inner": inner,
        "row_magic": plan.row_magic,
        "row_shift": plan.row_shift,
    }
    signature = {}
    for name in names[: kernel.pointers]:
        signature[name] = "*i32" if name == "mask_ptr" else f"*{TYPE_NAMES[dtype]}"
    for name, value in ints.items():
        signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    constexprs = {**kernel.constexprs, **plan.constexprs}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    # What the JIT tells the compiler of 16-byte-aligned pointers.
    divisible = {(names.index(name),): [["tt.divisibility", 16]] for name in signature
                 if signature[name].startswith("*")}  # fmt: skip
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=divisible)
    options = {"num_warps": triton_kernels.NUM_WARPS}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["ptx"], disassemble(compiled.asm["cubin"]), plan


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        command = [path_to_cuobjdump(), "-sass", file.name]
        # stderr: a note that cuobjdump's own nvdisasm call switched formats.
        return subprocess.check_output(command, text=True, stderr=subprocess.DEVNULL)


PTX_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)", re.MULTILINE)
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")
GLOBAL_ACCESS = re.compile(r"^(ld|st)\.global\.(?:[\w:]+\.)*?(?:v(\d)\.)?b(\d+)$")


class Counts(NamedTuple):
    ptx: Counter
    sass: Counter


def count(ptx: str, sass: str) -> Counts:
    # PTX mnemonics, dropping the directives and the debug sections.
    body = ptx.split(".section")[0]
    return Counts(Counter(PTX_INSTRUCTION.findall(body)), Counter(SASS_INSTRUCTION.findall(sass)))


def global_accesses(ptx_ops: Counter) -> dict[str, Counter]:
    """{"ld"/"st": Counter(bits per access -> count)}."""
    accesses = {"ld": Counter(), "st": Counter()}
    for op, n in ptx_ops.items():
        match = GLOBAL_ACCESS.match(op)
        if match:
            kind, lanes, bits = match.groups()
            accesses[kind][int(lanes or 1) * int(bits)] += n
    return accesses


def divisions(ptx_ops: Counter, bits: int) -> int:
    return sum(n for op, n in ptx_ops.items() if re.match(rf"(div|rem)\.[su]{bits}$", op))


def violations(kernel: Kernel, dtype, path_name: str, plan, counts: Counts) -> list[str]:
    found = []
    ptx_ops = counts.ptx
    if divisions(ptx_ops, 64) > 1 or divisions(ptx_ops, 32) > 1:
        found.append("divides per element (more than the program's one 64-bit div/rem)")
    if any(op.startswith("call") for op in ptx_ops):
        found.append("calls a helper")
    if any(".local" in op for op in ptx_ops) or any(op in ("LDL", "STL") for op in counts.sass):
        found.append("uses local memory")
    if path_name == "aligned":
        block = plan.constexprs["BLOCK"]
        vectors_per_array = block * dtype.itemsize * 8 // VECTOR_BITS // THREADS
        accesses = global_accesses(ptx_ops)
        for kind, arrays in (("ld", kernel.loads), ("st", kernel.stores)):
            wide = accesses[kind][VECTOR_BITS]
            narrow = sum(n for bits, n in accesses[kind].items() if bits != VECTOR_BITS)
            expected = arrays * vectors_per_array
            if wide != expected:
                found.append(f"{kind}.global: {wide} 128-bit accesses, expected {expected}")
            # Mask words: at most a block's pair per vector (a vector lies in
            # one block of 32 elements), which a warp reads at one address.
            if kind == "ld":
                touches_mask = kernel.name in ("backward", "double backward")
            else:
                touches_mask = kernel.constexprs.get("WRITE_MASK", False)
            if narrow > (vectors_per_array if touches_mask else 0):
                found.append(f"{kind}.global: {narrow} narrower than 128 bits")
    return found


def cuda_violations() -> list[str]:
    """The CUDA kernels' SASS check, where there is one to run."""
    script = Path(__file__).with_name("cuda_codegen.py")
    if not script.exists():
        print("CUDA SASS check: skipped, tools/cuda_codegen.py is not there")
        return []
    if "cuda" not in ops.NATIVE_DEVICE_TYPES:
        print("CUDA SASS check: skipped, crelu_ext was built without CUDA")
        return []
    spec = importlib.util.spec_from_file_location("cuda_codegen", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    args = parser.parse_args()
    print(f"triton {triton.__version__}; counts per thread, {THREADS} threads per program")
    header = ("kernel", "dtype", "sm", "path", "ld.global", "st.global", "div/rem 64|32",
              "mul.hi", "PTX", "SASS")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    failures = []
    for arch in args.arch:
        for kernel in KERNELS:
            for dtype in TYPE_NAMES:
                for path in PATHS:
                    ptx, sass, plan = compile_kernel(kernel, dtype, path, arch)
                    counts = count(ptx, sass)
                    accesses = global_accesses(counts.ptx)
                    mul_hi = sum(n for op, n in counts.ptx.items() if op.startswith("mul.hi"))
                    row = (kernel.name, TYPE_NAMES[dtype], arch, path[0],
                           _widths(accesses["ld"]), _widths(accesses["st"]),
                           f"{divisions(counts.ptx, 64)} \\| {divisions(counts.ptx, 32)}",
                           mul_hi, sum(counts.ptx.values()), sum(counts.sass.values()))  # fmt: skip
                    print("| " + " | ".join(map(str, row)) + " |", flush=True)
                    for problem in violations(kernel, dtype, path[0], plan, counts):
                        failures.append(f"{kernel.name} {TYPE_NAMES[dtype]} sm_{arch} "
                                        f"{path[0]}: {problem}")  # fmt: skip
    failures += cuda_violations()
    for failure in failures:
        print("VIOLATION:", failure)
    print(f"{len(failures)} violations")
    return 1 if failures else 0


def _widths(bits: Counter) -> str:
    # "2x128 1x32": accesses by width in bits, widest first.
    return " ".join(f"{n}x{b}" for b, n in sorted(bits.items(), reverse=True)) or "0"


if __name__ == "__main__":
    sys.exit(main())
