"""What is particular to the Triton backend: its two known traps, checked
value by value, and no recompiles per shape on a GPU."""

import pytest
import torch
from helpers import assert_bitwise_equal

import crelu_ext
from crelu_ext import triton_kernels


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
