"""What is particular to the Triton backend: its two known traps, checked
value by value, and no recompiles per shape on a GPU."""

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, make_input

import crelu_ext
from crelu_ext.triton import ops as triton_kernels


@pytest.fixture
def triton_device(backend_device):
    backend, device = backend_device
    if backend != "triton":
        pytest.skip("Triton backend only")
    return device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_negation_keeps_the_sign_of_zero(triton_device, dtype):
    # Unary minus lowers to 0 - x in Triton, which gives +0 for +0.
    x = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype, device=triton_device)
    pos, neg = crelu_ext.crelu(x, 0, backend="triton").chunk(2)
    assert torch.signbit(pos).tolist() == [False, True, False, False]
    assert torch.signbit(neg).tolist() == [True, False, False, False]
    assert neg.tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_nan_propagates_through_both_halves(triton_device, dtype):
    # tl.maximum(x, 0) would return 0 for NaN.
    x = torch.tensor([float("nan"), -float("nan"), 2.0], dtype=dtype, device=triton_device)
    x.requires_grad_(True)
    out = crelu_ext.crelu(x, 0, backend="triton")
    assert out.isnan().tolist() == [True, True, False, True, True, False]
    grad = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0], dtype=dtype, device=triton_device)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    # At NaN the gradient passes through both halves: g1 - g2.
    assert grad_x.tolist() == [-9.0, -18.0, 3.0]
    reference = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(crelu_ext.reference.crelu(reference, 0), reference, grad)
    assert_bitwise_equal(grad_x, expected)


@pytest.mark.cuda
def test_no_recompile_per_shape(triton_device):
    if triton_device != "cuda":
        pytest.skip("compiled kernels exist only on a GPU")
    kernel = triton_kernels._crelu_forward_kernel

    def compiled_variants():
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    crelu_ext.crelu(torch.randn(2, 16, 4, 4, device="cuda"), 1, backend="triton")
    before = compiled_variants()
    # Sizes keep Triton's divisibility-by-16 specialization the same.
    for shape in [(4, 32, 8, 8), (3, 48, 16, 16), (16, 16, 4, 4), (5, 64, 12, 12)]:
        crelu_ext.crelu(torch.randn(shape, device="cuda"), 1, backend="triton")
    assert compiled_variants() == before


# Shapes and dims for each way the kernels walk the [outer, inner] plan, with
# more elements than one program takes (BLOCK: 512 to 2048 by dtype).
PLAN_CASES = [
    pytest.param((37, 64), 1, id="short-rows"),  # channels_last C=64, MLP (B, 256)
    pytest.param((50, 24), 1, id="mask-blocks-span-rows"),
    pytest.param((29, 37), 1, id="odd-rows"),  # rows that are not whole vectors
    pytest.param((3, 1500), 1, id="long-rows"),  # programs start mid-row
    pytest.param((2, 2600), 1, id="longer-rows"),
    pytest.param((5000,), 0, id="single-row"),
    pytest.param((4000, 1), 1, id="rows-of-one"),
    pytest.param((0, 64), 1, id="empty"),
]


def _native_ops_match_triton_ops(x, dim):
    """The three Triton ops give the native CPU kernels' bits, mask bytes included."""
    out, mask = torch.ops.crelu_ext.triton_crelu(x, dim, True)
    expected_out, expected_mask = torch.ops.crelu_ext.crelu(x, dim, True)
    assert_bitwise_equal(out, expected_out, "forward")
    assert torch.equal(mask, expected_mask), "mask bytes differ"
    grad_out = make_input(out.shape, x.dtype, seed=5)
    fmt = torch.contiguous_format
    assert_bitwise_equal(
        torch.ops.crelu_ext.triton_crelu_backward(grad_out, mask, dim, fmt),
        torch.ops.crelu_ext.crelu_backward(grad_out, mask, dim, fmt),
        "backward",
    )
    grad_grad_x = make_input(x.shape, x.dtype, seed=6)
    assert_bitwise_equal(
        torch.ops.crelu_ext.triton_crelu_backward_backward(grad_grad_x, mask, dim, fmt),
        torch.ops.crelu_ext.crelu_backward_backward(grad_grad_x, mask, dim, fmt),
        "double backward",
    )


@pytest.fixture
def triton_and_native_cpu(triton_device):
    if triton_device != "cpu" or "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("compares with the native CPU kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "dim"), PLAN_CASES)
def test_every_plan_matches_native_bits(triton_and_native_cpu, shape, dim, dtype):
    _native_ops_match_triton_ops(make_input(shape, dtype), dim)


def test_misaligned_input_matches_native_bits(triton_and_native_cpu):
    flat = make_input((37 * 64 + 1,), torch.float32)
    x = flat[1:].view(37, 64)  # 4 bytes past a 16-byte boundary: the scalar path
    assert x.data_ptr() % triton_kernels.VECTOR_BYTES != 0
    _native_ops_match_triton_ops(x, 1)


def test_rows_past_int32_take_the_wide_path(triton_and_native_cpu, monkeypatch):
    # Rows of 2**31 elements cannot run here; lowering the limit sends rows of
    # 3000 through the same code.
    monkeypatch.setattr(triton_kernels, "INT32_MAX", 3000 + 2 * 1024 - 1)
    assert triton_kernels.plan_grid(6000, 3000, 4, True).constexprs["WIDE_ROWS"]
    _native_ops_match_triton_ops(make_input((2, 3000), torch.float32), 1)


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
