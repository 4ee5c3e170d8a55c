"""Every backend against the reference, bitwise, forward and backward, over
shapes x dtypes x layouts x every dim, with special values."""

import pytest
import torch
from helpers import LAYOUTS, assert_bitwise_equal, crelu_and_grad, make_input, skip_unsupported

import crelu_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [
    (7,),
    (3, 37),  # odd rows: the scalar path
    (2, 64, 4, 4),  # rows of multiples of 32: the vector path
    (2, 3, 5, 7),
    (2, 16, 3, 4, 2),
    (2, 1, 3, 1, 2, 5),
    (1, 1, 1, 1),
    (0, 3, 4, 5),
    (4, 0, 2, 1),
]


# Only the layouts that apply to each shape (channels_last needs 4-D, ...).
SHAPE_LAYOUTS = [
    pytest.param(shape, layout, id=f"{shape}-{layout}")
    for shape in SHAPES
    for layout, make_layout in LAYOUTS.items()
    if make_layout(torch.zeros(shape)) is not None
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), SHAPE_LAYOUTS)
def test_forward_and_backward_match_reference(backend_device, shape, layout, dtype):
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    x = LAYOUTS[layout](make_input(shape, dtype, device))
    for dim in range(-x.dim(), x.dim()):
        expected = torch.cat([torch.relu(x), torch.relu(-x)], dim)
        grad = make_input(expected.shape, dtype, device, seed=dim + 7)
        _, expected_grad = crelu_and_grad(x, dim, grad, "reference")
        out, grad_x = crelu_and_grad(x, dim, grad, backend)
        assert_bitwise_equal(out, expected, f"forward dim={dim}")
        assert out.stride() == expected.stride(), f"dim={dim}: strides differ from torch.cat"
        assert_bitwise_equal(grad_x, expected_grad, f"backward dim={dim}")
        with torch.no_grad():
            assert_bitwise_equal(crelu_ext.crelu(x, dim, backend=backend), expected, "no_grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_rows_take_the_vector_path(backend_device, dtype):
    # Enough elements for several parallel tasks and both vector and tail paths.
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    x = make_input((3, 96, 17, 19), dtype, device, seed=3).to(memory_format=torch.channels_last)
    grad = make_input((3, 192, 17, 19), dtype, device, seed=4)
    expected, expected_grad = crelu_and_grad(x, 1, grad, "reference")
    out, grad_x = crelu_and_grad(x, 1, grad, backend)
    assert_bitwise_equal(out, expected, "forward")
    assert_bitwise_equal(grad_x, expected_grad, "backward")


def test_module_matches_functional(backend_device):
    backend, device = backend_device
    x = make_input((2, 8, 5, 5), torch.float32, device)
    module = crelu_ext.CReLU(dim=-3, backend=backend)
    assert "dim=-3" in repr(module)
    assert_bitwise_equal(module(x), crelu_ext.reference.crelu(x, -3))


def test_autocast_keeps_dtype(backend_device):
    backend, device = backend_device
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = crelu_ext.crelu(x, 1, backend=backend)
    assert out.dtype == torch.float32
    assert_bitwise_equal(out, crelu_ext.reference.crelu(x, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_outputs_large_enough_for_streaming_stores(backend_device, dtype):
    # Outputs over 8 MiB are written with non-temporal stores on CPU when their
    # memory is already mapped, which a repeated allocation of one size makes
    # likely; each run must give the reference's bits.
    backend, device = backend_device
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("12M elements take minutes in Triton's interpreter")
    x = make_input((2, 3, 1000, 1001), dtype, device, seed=9)
    grad = make_input((2, 6, 1000, 1001), dtype, device, seed=10)
    expected, expected_grad = crelu_and_grad(x, 1, grad, "reference")
    for _ in range(3):
        out, grad_x = crelu_and_grad(x, 1, grad, backend)
        assert_bitwise_equal(out, expected, "forward")
        assert_bitwise_equal(grad_x, expected_grad, "backward")
