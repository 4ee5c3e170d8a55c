"""Every backend against the reference, bitwise, forward and backward, over
shapes x dtypes x layouts x every dim, with special values."""

import itertools

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_bitwise_equal,
    backend_devices,
    backend_devices_and_dtypes,
    crelu_and_grad,
    make_input,
)

import crelu_ext
from crelu_ext._layout import allocate_forward

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


@pytest.mark.parametrize(("backend_device", "dtype"), backend_devices_and_dtypes(DTYPES))
@pytest.mark.parametrize(("shape", "layout"), SHAPE_LAYOUTS)
def test_forward_and_backward_match_reference(backend_device, shape, layout, dtype):
    backend, device = backend_device
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


# Shapes with size-1 dims: there strides do not fix a memory format, and
# torch.cat's choice follows TensorIterator's and suggest_memory_format's rules.
AMBIGUOUS_SHAPES = [
    *(s for s in itertools.product((1, 2, 3), repeat=4) if 1 in s),
    *(s for s in itertools.product((1, 2), repeat=5) if 1 in s),
    (2, 1, 5, 7),
    (1, 3, 1, 1),
    (1, 3, 1, 1, 1),
]


def size_one_strides(t, stride):
    """t with `stride` on its size-1 dims: the same memory, other strides."""
    strides = [stride if size == 1 else st for size, st in zip(t.shape, t.stride(), strict=True)]
    return t.as_strided(t.shape, strides)


def canonical(t) -> bool:
    """Whether t has the strides torch.empty gives in some memory format."""
    formats = [torch.contiguous_format]
    formats += {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(t.dim(), [])
    return any(t.stride() == torch.empty(t.shape, memory_format=f).stride() for f in formats)


def ambiguous_layouts(x):
    """(name, tensor, backward strides checked): x contiguous, converted to
    channels_last(_3d), with other strides on its size-1 dims, with its last
    two dims swapped in memory, and sliced. Autograd through torch.cat gives
    x's gradient x's own stride order, which the op's backward (one memory
    format) matches for the first four where a memory format can express it."""
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    converted = x.to(memory_format=channels_last)
    yield "contiguous", x, True
    yield str(channels_last), converted, True
    for base, name in ((x, "contiguous"), (converted, str(channels_last))):
        for stride in (1, 1000):
            yield f"{name}, size-1 strides {stride}", size_one_strides(base, stride), True
    yield "last two dims swapped", x.mT.contiguous().mT, False
    yield "sliced", torch.cat([x, x], -1)[..., ::2], False


def compiled(backend, device):
    """All but Triton's interpreter, which runs kernels a thousand times slower."""
    return (backend, device) != ("triton", "cpu")


# Every shape takes minutes in Triton's interpreter: there, those with one channel.
AMBIGUOUS_CASES = [
    pytest.param(case.values[0], shape, id=f"{case.id}-{shape}", marks=case.marks)
    for case in backend_devices()
    for shape in AMBIGUOUS_SHAPES
    if compiled(*case.values[0]) or shape[1] == 1
]


@pytest.mark.parametrize(("backend_device", "shape"), AMBIGUOUS_CASES)
def test_strides_follow_torch_cat_when_the_layout_is_ambiguous(backend_device, shape):
    backend, device = backend_device
    x0 = make_input(shape, torch.float32, device)
    for name, x, check_grad_strides in ambiguous_layouts(x0):
        for dim in range(x.dim()):
            what = f"{name} {tuple(x.stride())} dim={dim}"
            expected = torch.cat([torch.relu(x), torch.relu(-x)], dim)
            grad = make_input(expected.shape, torch.float32, device, seed=dim + 1)
            _, expected_grad = crelu_and_grad(x, dim, grad, "reference")
            out, grad_x = crelu_and_grad(x, dim, grad, backend)
            assert_bitwise_equal(out, expected, what)
            assert out.stride() == expected.stride(), f"{what}: strides differ from torch.cat"
            assert_bitwise_equal(grad_x, expected_grad, f"backward {what}")
            if check_grad_strides and canonical(expected_grad):
                assert grad_x.stride() == expected_grad.stride(), f"backward {what}: strides"


def test_fake_kernels_give_torch_cat_strides():
    # The fake kernels and the Triton backend allocate with _layout's rules.
    for shape in AMBIGUOUS_SHAPES:
        for name, x, _ in ambiguous_layouts(torch.randn(shape)):
            for dim in range(x.dim()):
                expected = torch.cat([torch.relu(x), torch.relu(-x)], dim)
                out, _ = allocate_forward(x, dim, save_mask=False)
                assert out.stride() == expected.stride(), f"{shape} {name} dim={dim}"


@pytest.mark.parametrize(("backend_device", "dtype"), backend_devices_and_dtypes(DTYPES))
def test_large_rows_take_the_vector_path(backend_device, dtype):
    # Enough elements for several parallel tasks and both vector and tail paths.
    backend, device = backend_device
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


# 12M elements take minutes in Triton's interpreter.
@pytest.mark.parametrize(
    ("backend_device", "dtype"),
    backend_devices_and_dtypes([torch.float32, torch.float16], include=compiled),
)
def test_outputs_large_enough_for_streaming_stores(backend_device, dtype):
    # Outputs over 8 MiB are written with non-temporal stores on CPU when their
    # memory is already mapped, which a repeated allocation of one size makes
    # likely; each run must give the reference's bits.
    backend, device = backend_device
    x = make_input((2, 3, 1000, 1001), dtype, device, seed=9)
    grad = make_input((2, 6, 1000, 1001), dtype, device, seed=10)
    expected, expected_grad = crelu_and_grad(x, 1, grad, "reference")
    for _ in range(3):
        out, grad_x = crelu_and_grad(x, 1, grad, backend)
        assert_bitwise_equal(out, expected, "forward")
        assert_bitwise_equal(grad_x, expected_grad, "backward")
