"""Gradients: gradcheck, double backward against the reference, and what
autograd keeps alive (only the packed 2-bit mask)."""

import pytest
import torch
from helpers import FORWARD_OPS, assert_bitwise_equal, backend_devices, make_input

import crelu_ext
from crelu_ext._layout import mask_bytes


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gradcheck_and_gradgradcheck(backend_device, memory_format):
    backend, device = backend_device
    # No zeros: CReLU is not differentiable there and finite differences disagree.
    # 36 elements: two 32-element mask blocks, the second partial; finite
    # differences run the op twice per element, slow in Triton's interpreter.
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=device)
    x = (x + x.sign() * 0.1).to(memory_format=memory_format).requires_grad_(True)
    for dim in (1, -1, 0):

        def fn(t, dim=dim):
            return crelu_ext.crelu(t, dim, backend=backend)

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_double_and_triple_backward_match_reference(backend_device, dtype):
    backend, device = backend_device
    x0 = make_input((3, 8, 5), dtype, device)
    g0 = make_input((3, 16, 5), dtype, device, seed=1)
    gg = make_input((3, 8, 5), dtype, device, seed=2)
    ggg = make_input((3, 16, 5), dtype, device, seed=3)

    def derivatives(use_reference):
        x = x0.clone().requires_grad_(True)
        g = g0.clone().requires_grad_(True)
        gg_ = gg.clone().requires_grad_(True)
        out = (
            crelu_ext.reference.crelu(x, 1)
            if use_reference
            else crelu_ext.crelu(x, 1, backend=backend)
        )
        (grad_x,) = torch.autograd.grad(out, x, g, create_graph=True)
        (grad_g,) = torch.autograd.grad(grad_x, g, gg_, create_graph=True)
        # The double backward is linear in gg; its derivative is the backward again.
        (grad_gg,) = torch.autograd.grad(grad_g, gg_, ggg)
        return grad_x, grad_g, grad_gg

    for actual, expected, what in zip(
        derivatives(False),
        derivatives(True),
        ["backward", "double backward", "triple backward"],
        strict=True,
    ):
        assert_bitwise_equal(actual, expected, what)


def saved_tensors(fn, x):
    """The tensors autograd saves while running fn(x)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return saved, out


@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (3, 5, 7)], ids=str)
def test_saves_only_the_packed_mask(shape):
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("native backend not built")
    x = torch.randn(shape, requires_grad=True)
    saved, out = saved_tensors(lambda t: crelu_ext.crelu(t, 1, backend="native"), x)
    assert len(saved) == 1
    (mask,) = saved
    assert mask.dtype == torch.uint8
    # 2 bits per element, rounded up to whole 32-element blocks.
    assert mask.numel() * 8 <= 2 * x.numel() + 2 * 31
    for kept in (x, out):
        assert mask.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    # The reference keeps both relu outputs: 2x the activation in full precision.
    ref_saved, _ = saved_tensors(lambda t: crelu_ext.reference.crelu(t, 1), x)
    assert sum(t.numel() * t.element_size() for t in ref_saved) >= 2 * x.numel() * 4


def test_inference_writes_no_mask():
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("native backend not built")
    x = torch.randn(2, 8, 4, 4)
    out, mask = torch.ops.crelu_ext.crelu(x, 1, False)
    assert mask.numel() == 0
    for requires_grad, grad_mode in [(False, True), (True, False)]:
        xr = x.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_mode):
            saved, out = saved_tensors(lambda t: crelu_ext.crelu(t, 1, backend="native"), xr)
        assert saved == []
        assert out.grad_fn is None


def test_the_native_op_writes_the_mask_when_autograd_records_the_call():
    # save_mask=False asks for no mask, but autograd (decided in C++) needs one.
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("native backend not built")
    x = make_input((2, 40), torch.float32).requires_grad_(True)
    out, mask = torch.ops.crelu_ext.crelu(x, 1, False)
    assert mask.numel() == mask_bytes(x.numel())
    g = make_input((2, 80), torch.float32, seed=1)
    (grad_x,) = torch.autograd.grad(out, x, g)
    (expected,) = torch.autograd.grad(crelu_ext.reference.crelu(x, 1), x, g)
    assert_bitwise_equal(grad_x, expected)


# Backends with autograd in Python register it on their ops; the native op
# decides in C++ (above) and the reference has no op.
@pytest.mark.parametrize(
    "backend_device", backend_devices(include=lambda b, d: b not in ("native", "reference"))
)
def test_differentiating_a_maskless_call_is_a_clear_error(backend_device):
    # A direct call asked for no mask cannot be differentiated.
    backend, device = backend_device
    op = FORWARD_OPS[backend]
    x = torch.randn(2, 4, device=device, requires_grad=True)
    out, _ = getattr(torch.ops.crelu_ext, op)(x, 1, False)
    with pytest.raises(RuntimeError, match=rf"crelu_ext\.{op}: .*save_mask=True"):
        out.sum().backward()
