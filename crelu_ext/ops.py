"""The native ops (csrc/): fake kernels and autograd, registered on the
schemas that csrc/ops.cpp defines."""

import torch

from ._autograd import call_forward, register_crelu_autograd
from ._layout import (
    allocate_backward,
    allocate_backward_backward,
    allocate_forward,
    check_input,
)

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
    """The native forward."""
    return call_forward(torch.ops.crelu_ext.crelu, x, dim)


def _fake_crelu(x, dim, save_mask):
    return allocate_forward(x, check_input(x, dim), save_mask)


def _fake_backward(grad_out, mask, dim, memory_format):
    return allocate_backward(grad_out, check_input(grad_out, dim, "crelu_backward"), memory_format)


def _fake_backward_backward(grad_grad_x, mask, dim, memory_format):
    dim = check_input(grad_grad_x, dim, "crelu_backward_backward")
    return allocate_backward_backward(grad_grad_x, dim, memory_format)


def _register() -> None:
    torch.library.register_fake("crelu_ext::crelu", _fake_crelu)
    torch.library.register_fake("crelu_ext::crelu_backward", _fake_backward)
    torch.library.register_fake("crelu_ext::crelu_backward_backward", _fake_backward_backward)
    register_crelu_autograd("crelu", "crelu_backward", "crelu_backward_backward")


if NATIVE_IMPORT_ERROR is None:
    _register()
