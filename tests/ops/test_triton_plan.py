"""The Triton backend's launch plan, in Python: the row divider, the grid
and constexprs for each case, symbolic sizes, and the PTX checks of
tools/codegen_check.py. No device needed."""

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from crelu_ext.triton import ops as triton_kernels


def _multiply_high_divide(n: int, magic: int, shift: int) -> int:
    # The kernels' arithmetic on uint32.
    magic %= 2**32
    return ((n * magic >> 32) + n) % 2**32 >> shift


@pytest.mark.parametrize(
    "inner", [1, 2, 3, 7, 24, 37, 64, 100, 255, 256, 1000, 2**20 + 1, 2**31 - 4097]
)
def test_row_divider_divides_exactly(inner):
    magic, shift = triton_kernels.row_divider(inner)
    assert -(2**31) <= magic < 2**31  # passed as an int32
    gen = torch.Generator().manual_seed(inner)
    samples = torch.randint(0, 2**31, (2000,), generator=gen).tolist()
    edges = [0, 1, inner - 1, inner, inner + 1, 2 * inner - 1, 2 * inner, 2**31 - 1]
    for n in [*range(0, 5 * inner, max(1, inner // 50)), *samples, *edges]:
        if 0 <= n < 2**31:
            assert _multiply_high_divide(n, magic, shift) == n // inner, n


@pytest.mark.parametrize(
    ("numel", "inner", "element_size", "aligned", "vectors", "wide", "grid"),
    [
        (4096, 64, 4, True, True, False, 4),
        (4096, 64, 4, False, False, False, 4),  # a pointer off 16 bytes
        (37 * 6, 6, 4, True, False, False, 1),  # rows of 6 floats: not whole vectors
        (8 * 3, 8, 2, True, True, False, 1),
        (2 * 12, 12, 2, True, False, False, 1),  # 8 halves per vector
        (1, 1, 8, True, False, False, 1),
        # The last rows whose columns, plus two programs, fit in int32; then wider.
        (2 * (2**31 - 2052), 2**31 - 2052, 4, True, True, False, 2**22 - 4),
        (2 * (2**31 - 2048), 2**31 - 2048, 4, True, True, True, 2**22 - 4),
        (3 * 2**33, 2**33, 2, True, True, True, 3 * 2**22),
    ],
)
def test_plan_grid(numel, inner, element_size, aligned, vectors, wide, grid):
    plan = triton_kernels.plan_grid(numel, inner, element_size, aligned)
    assert plan.grid == (grid,)
    assert plan.constexprs["ALIGNED"] == vectors
    assert plan.constexprs["WIDE_ROWS"] == wide
    assert plan.constexprs["BLOCK"] * element_size == 4096
    assert plan.constexprs["VECTOR"] * element_size == 16
    if not wide:
        assert (plan.row_magic, plan.row_shift) == triton_kernels.row_divider(inner)


def test_plan_grid_takes_symbolic_sizes():
    # torch.compile(dynamic=True) traces the launch with symbolic sizes: the
    # constexprs must come out concrete and the divider must stay exact.
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()

    def symbolic(value, name):
        return env.create_symintnode(env.create_symbol(value, ConstantSource(name)), hint=value)

    plan = triton_kernels.plan_grid(symbolic(4800, "numel"), symbolic(200, "inner"), 4, True)
    expected = triton_kernels.plan_grid(4800, 200, 4, True)
    assert plan.constexprs == expected.constexprs
    assert all(type(value) in (bool, int) for value in plan.constexprs.values())
    assert (int(plan.grid[0]), int(plan.row_magic), plan.row_shift) == (
        expected.grid[0],
        expected.row_magic,
        expected.row_shift,
    )


def _codegen_check():
    pytest.importorskip("triton")
    path = Path(__file__).parents[2] / "tools" / "codegen_check.py"
    spec = importlib.util.spec_from_file_location("codegen_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_codegen_check_reports_what_the_old_kernels_did():
    # Scalar accesses, a division per element and a spill, in PTX as Triton writes it.
    check = _codegen_check()
    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p1 ld.global.b32 { %r5 }, [ %rd2 + 0 ];
        @!%p2 st.global.L1::evict_first.v2.b64 [ %rd3 + 0 ], { %rd4, %rd5 };
        rem.s64 	%rd6, %rd7, %rd8;
        rem.s64 	%rd9, %rd10, %rd8;
        st.local.b32 	[%rd11], %r1;
    """
    counts = check.count(ptx, "")
    assert check.global_accesses(counts.ptx) == {
        "ld": Counter({128: 1, 32: 1}),
        "st": Counter({128: 1}),
    }
    assert check.divisions(counts.ptx, 64) == 2
    forward = check.KERNELS[0]
    plan = triton_kernels.plan_grid(4096, 64, 4, True)
    assert check.violations(forward, torch.float32, "aligned", plan, counts) == [
        "divides per element (more than the program's one 64-bit div/rem)",
        "uses local memory",
        "ld.global: 1 128-bit accesses, expected 2",
        "ld.global: 1 narrower than 128 bits",
        "st.global: 1 128-bit accesses, expected 4",
    ]
