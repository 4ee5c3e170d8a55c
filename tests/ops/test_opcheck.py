"""torch.library.opcheck: schema, autograd registration, fake kernels and
AOT dispatch, on every sample of every native op."""

import pytest
import torch
from helpers import backend_devices, make_input, unsupported

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


# Each backend's three ops, by op name prefix; the reference has none.
OP_PREFIX = {
    "native": "",
    "triton": "triton_",
    "emulated": "emulated_",
    "emulated64": "emulated64_",
}


@pytest.fixture(params=backend_devices(include=lambda b, d: b in OP_PREFIX))
def backend_ops(request):
    backend, device = request.param
    prefix = OP_PREFIX[backend]

    # Interpreted Triton kernels are Python functions that tracing cannot see
    # into (see test_compile.py), so AOT dispatch is checked on GPUs only.
    test_utils = (
        ("test_schema", "test_autograd_registration", "test_faketensor")
        if (backend, device) == ("triton", "cpu")
        else torch.library._OPCHECK_DEFAULT_UTILS
    )

    def op(name):
        return getattr(torch.ops.crelu_ext, prefix + name).default

    def check(name, args):
        torch.library.opcheck(op(name), args, test_utils=test_utils)

    return backend, device, op, check


def test_opcheck_crelu(backend_ops):
    backend, device, _, check = backend_ops
    for x, dim, requires_grad in forward_samples(device):
        if unsupported(backend, device, x.dtype):
            continue
        check("crelu", (x.detach().requires_grad_(requires_grad), dim, requires_grad))


def test_opcheck_backward_ops(backend_ops):
    backend, device, op, check = backend_ops
    for x, dim, _ in forward_samples(device):
        if unsupported(backend, device, x.dtype):
            continue
        memory_format = crelu_ext._layout.output_memory_format(x)
        _, mask = op("crelu")(x, dim, True)
        assert mask.numel() == mask_bytes(x.numel())
        out_shape = list(x.shape)
        out_shape[dim] *= 2
        grad_out = sample(out_shape, x.dtype, device, seed=5)
        grad_x = sample(x.shape, x.dtype, device, seed=6)
        if x.dtype.itemsize >= 4:
            grad_out.requires_grad_(True)
            grad_x.requires_grad_(True)
        check("crelu_backward", (grad_out, mask, dim, memory_format))
        check("crelu_backward_backward", (grad_x, mask, dim, memory_format))
