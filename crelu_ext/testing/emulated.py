"""The CUDA kernels run on the host, for tests: a private backend (SPEC section 2).

csrc/cuda/crelu_cuda.cu compiles each kernel's per-thread body for host and
device. Its grid emulator runs, on CPU tensors, the launch the GPU would get
(same vectorized-or-scalar choice, offset width and block count, for a GPU of
132 SMs), one (block, thread) after another, and registers the result as the
ops ``crelu_ext::emulated_crelu``, ``emulated_crelu_backward`` and
``emulated_crelu_backward_backward``; the ``emulated64_`` ops force 64-bit
offsets. They are there whenever the package was built with its CUDA sources,
and need no GPU.
"""

import torch

from .. import _native
from .._autograd import call_forward, register_crelu_autograd
from .._checks import check_input

# Op name prefix by index_bits: None keeps the launcher's choice.
OP_PREFIXES = {None: "emulated_", 64: "emulated64_"}


def _unavailable_reason() -> str | None:
    if _native.NATIVE_IMPORT_ERROR is not None:
        return f"the compiled extension did not load: {_native.NATIVE_IMPORT_ERROR}"
    if not hasattr(torch.ops.crelu_ext, "emulated_crelu"):
        return "the compiled extension was built without its CUDA sources"
    return None


UNAVAILABLE_REASON = _unavailable_reason()
AVAILABLE = UNAVAILABLE_REASON is None


def crelu(x: torch.Tensor, dim: int, index_bits: int | None = None) -> torch.Tensor:
    """``crelu_ext.crelu`` through the emulated CUDA kernels, on a CPU tensor;
    differentiable to any order. ``index_bits=64`` forces 64-bit offsets."""
    if not AVAILABLE:
        raise RuntimeError(f"crelu_ext.testing.emulated.crelu: not available: {UNAVAILABLE_REASON}")
    if index_bits not in OP_PREFIXES:
        raise ValueError(
            f"crelu_ext.testing.emulated.crelu: index_bits must be None or 64, got {index_bits!r}"
        )
    dim = check_input(x, dim)
    if x.device.type != "cpu":
        raise ValueError(f"crelu_ext.testing.emulated.crelu: expected a CPU tensor, got {x.device}")
    forward_op = getattr(torch.ops.crelu_ext, OP_PREFIXES[index_bits] + "crelu")
    return call_forward(forward_op, x, dim)


def _register() -> None:
    for prefix in OP_PREFIXES.values():
        # The same schemas as the native ops, so the same fake kernels.
        torch.library.register_fake(f"crelu_ext::{prefix}crelu", _native._fake_crelu)
        torch.library.register_fake(f"crelu_ext::{prefix}crelu_backward", _native._fake_backward)
        torch.library.register_fake(
            f"crelu_ext::{prefix}crelu_backward_backward", _native._fake_backward_backward
        )
        register_crelu_autograd(
            f"{prefix}crelu", f"{prefix}crelu_backward", f"{prefix}crelu_backward_backward"
        )


if AVAILABLE:
    _register()
