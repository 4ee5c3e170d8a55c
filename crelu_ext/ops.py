"""The native ops (csrc/): fake kernels and autograd, registered on the
schemas that csrc/ops.cpp defines.

Autograd saves only the packed 2-bit sign mask. The backward is linear in the
incoming gradient, and ``crelu_backward`` and ``crelu_backward_backward`` are
each other's adjoints, so each one's backward is the other: every order of
derivative works.
"""

import torch

from ._layout import check_input, mask_bytes, output_memory_format, scaled_shape

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.crelu_ext.*)
except ImportError as error:  # no compiled part: only the reference backend
    NATIVE_IMPORT_ERROR: ImportError | None = error
else:
    NATIVE_IMPORT_ERROR = None


# Device types with compiled kernels, read once: the registrations are fixed
# once _C has loaded, and torch.compile can trace a set lookup.
NATIVE_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if NATIVE_IMPORT_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("crelu_ext::crelu", key)
)


def native_available(device: torch.device) -> bool:
    return device.type in NATIVE_DEVICE_TYPES


def crelu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The native forward; writes the mask only when autograd will need it."""
    save_mask = torch.is_grad_enabled() and x.requires_grad
    out, _ = torch.ops.crelu_ext.crelu(x, dim, save_mask)
    return out


def _empty(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _fake_crelu(x, dim, save_mask):
    dim = check_input(x, dim)
    out = _empty(scaled_shape(x.shape, dim, 2, 1), x, output_memory_format(x))
    mask = x.new_empty((mask_bytes(x.numel()) if save_mask else 0,), dtype=torch.uint8)
    return out, mask


def _fake_backward(grad_out, mask, dim, memory_format):
    dim = check_input(grad_out, dim, "crelu_backward")
    return _empty(scaled_shape(grad_out.shape, dim, 1, 2), grad_out, memory_format)


def _fake_backward_backward(grad_grad_x, mask, dim, memory_format):
    dim = check_input(grad_grad_x, dim, "crelu_backward_backward")
    return _empty(scaled_shape(grad_grad_x.shape, dim, 2, 1), grad_grad_x, memory_format)


def _setup_crelu(ctx, inputs, output):
    x, dim, save_mask = inputs
    _, mask = output
    ctx.dim = dim
    ctx.memory_format = output_memory_format(x)
    ctx.save_mask = save_mask
    ctx.save_for_backward(mask)
    ctx.mark_non_differentiable(mask)


def _crelu_backward(ctx, grad_out, _grad_mask):
    if not ctx.save_mask:
        raise RuntimeError(
            "crelu_ext.crelu: cannot differentiate a call made with save_mask=False; "
            "call it with save_mask=True when the input requires grad"
        )
    (mask,) = ctx.saved_tensors
    grad_x = torch.ops.crelu_ext.crelu_backward(grad_out, mask, ctx.dim, ctx.memory_format)
    return grad_x, None, None


def _setup_masked(ctx, inputs, output):
    _, mask, dim, memory_format = inputs
    ctx.dim = dim
    ctx.memory_format = memory_format
    ctx.save_for_backward(mask)


def _backward_of(adjoint):
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return adjoint(grad, mask, ctx.dim, ctx.memory_format), None, None, None

    return backward


def _register() -> None:
    ops = torch.ops.crelu_ext
    torch.library.register_fake("crelu_ext::crelu", _fake_crelu)
    torch.library.register_fake("crelu_ext::crelu_backward", _fake_backward)
    torch.library.register_fake("crelu_ext::crelu_backward_backward", _fake_backward_backward)
    torch.library.register_autograd("crelu_ext::crelu", _crelu_backward, setup_context=_setup_crelu)
    torch.library.register_autograd(
        "crelu_ext::crelu_backward",
        _backward_of(ops.crelu_backward_backward),
        setup_context=_setup_masked,
    )
    torch.library.register_autograd(
        "crelu_ext::crelu_backward_backward",
        _backward_of(ops.crelu_backward),
        setup_context=_setup_masked,
    )


if NATIVE_IMPORT_ERROR is None:
    _register()
