"""What is particular to the Triton kernels: their two known traps, checked
value by value, the native CPU kernels' bits and mask bytes for every launch
plan, and no recompiles per shape on a GPU. The launch plan itself, which
needs no device, is in test_triton_plan.py."""

import pytest
import torch
from helpers import BACKEND_DEVICES, assert_bitwise_equal, make_input

import crelu_ext
from crelu_ext.triton import ops as triton_kernels

TRITON_DEVICES = [device for backend, device in BACKEND_DEVICES if backend == "triton"]
if not TRITON_DEVICES:
    pytest.skip(
        "Triton runs on no device here: no GPU, and TRITON_INTERPRET=1 is not set",
        allow_module_level=True,
    )


@pytest.fixture(
    params=[
        pytest.param(d, id=f"triton-{d}", marks=[pytest.mark.cuda] if d == "cuda" else [])
        for d in TRITON_DEVICES
    ]
)
def triton_device(request):
    return request.param


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
@pytest.mark.skipif("cuda" not in TRITON_DEVICES, reason="no CUDA device")
def test_no_recompile_per_shape():
    # Compiled kernels exist only on a GPU.
    kernel = triton_kernels._crelu_forward_kernel

    def compiled_variants():
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    crelu_ext.crelu(torch.randn(2, 16, 4, 4, device="cuda"), 1, backend="triton")
    before = compiled_variants()
    assert before > 0, "the first call compiled no kernel"
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
    """The three Triton ops, on x's device, give the native CPU kernels' bits,
    mask bytes included."""
    ops, cpu, fmt = torch.ops.crelu_ext, x.cpu(), torch.contiguous_format
    out, mask = ops.triton_crelu(x, dim, True)
    expected_out, expected_mask = ops.crelu(cpu, dim, True)
    assert_bitwise_equal(out, expected_out, "forward")
    assert torch.equal(mask.cpu(), expected_mask), "mask bytes differ"
    grad_out = make_input(out.shape, x.dtype, seed=5)
    assert_bitwise_equal(
        ops.triton_crelu_backward(grad_out.to(x.device), mask, dim, fmt),
        ops.crelu_backward(grad_out, expected_mask, dim, fmt),
        "backward",
    )
    grad_grad_x = make_input(x.shape, x.dtype, seed=6)
    assert_bitwise_equal(
        ops.triton_crelu_backward_backward(grad_grad_x.to(x.device), mask, dim, fmt),
        ops.crelu_backward_backward(grad_grad_x, expected_mask, dim, fmt),
        "double backward",
    )


@pytest.fixture
def triton_and_native_cpu(triton_device):
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("compares with the native CPU kernels, which are not built")
    return triton_device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "dim"), PLAN_CASES)
def test_every_plan_matches_native_bits(triton_and_native_cpu, shape, dim, dtype):
    _native_ops_match_triton_ops(make_input(shape, dtype, triton_and_native_cpu), dim)


def test_misaligned_input_matches_native_bits(triton_and_native_cpu):
    flat = make_input((37 * 64 + 1,), torch.float32, triton_and_native_cpu)
    x = flat[1:].view(37, 64)  # 4 bytes past a 16-byte boundary: the scalar path
    assert x.data_ptr() % triton_kernels.VECTOR_BYTES != 0
    _native_ops_match_triton_ops(x, 1)


def test_rows_past_int32_take_the_wide_path(triton_and_native_cpu, monkeypatch):
    # Rows of 2**31 elements cannot run here; lowering the limit sends rows of
    # 3000 through the same code.
    monkeypatch.setattr(triton_kernels, "INT32_MAX", 3000 + 2 * 1024 - 1)
    assert triton_kernels.plan_grid(6000, 3000, 4, True).constexprs["WIDE_ROWS"]
    _native_ops_match_triton_ops(make_input((2, 3000), torch.float32, triton_and_native_cpu), 1)
