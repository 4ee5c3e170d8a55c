"""torch.library.opcheck: schema, autograd registration, fake kernels and
AOT dispatch, on every sample of every native op."""

import pytest
import torch
from helpers import make_input

import crelu_ext
from crelu_ext._layout import mask_bytes


def sample(shape, dtype, device, seed=0):
    # opcheck compares outputs with assert_close, which fails on NaN == NaN;
    # the special values are covered bitwise by test_parity.py.
    return make_input(shape, dtype, device, seed=seed, special_fraction=0.0)


def forward_samples(device):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for requires_grad in (False, True) if dtype.itemsize >= 4 else (False,):
            yield sample((2, 3, 4, 5), dtype, device), 1, requires_grad
            yield (
                sample((2, 6, 3, 5), dtype, device).to(memory_format=torch.channels_last),
                -3,
                requires_grad,
            )
            yield sample((7, 9), dtype, device).t(), 0, requires_grad
            yield sample((33,), dtype, device)[1:], 0, requires_grad
            yield (
                sample((2, 3, 2, 3, 2), dtype, device).to(memory_format=torch.channels_last_3d),
                2,
                requires_grad,
            )


@pytest.fixture
def native_device(backend_device):
    backend, device = backend_device
    if backend != "native":
        pytest.skip("opcheck covers the native ops")
    return device


def test_opcheck_crelu(native_device):
    for x, dim, requires_grad in forward_samples(native_device):
        x = x.detach().requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.crelu_ext.crelu.default, (x, dim, requires_grad))


def test_opcheck_backward_ops(native_device):
    for x, dim, _ in forward_samples(native_device):
        memory_format = crelu_ext._layout.output_memory_format(x)
        _, mask = torch.ops.crelu_ext.crelu(x, dim, True)
        assert mask.numel() == mask_bytes(x.numel())
        out_shape = list(x.shape)
        out_shape[dim] *= 2
        grad_out = sample(out_shape, x.dtype, native_device, seed=5)
        grad_x = sample(x.shape, x.dtype, native_device, seed=6)
        if x.dtype.itemsize >= 4:
            grad_out.requires_grad_(True)
            grad_x.requires_grad_(True)
        torch.library.opcheck(
            torch.ops.crelu_ext.crelu_backward.default, (grad_out, mask, dim, memory_format)
        )
        torch.library.opcheck(
            torch.ops.crelu_ext.crelu_backward_backward.default,
            (grad_x, mask, dim, memory_format),
        )
