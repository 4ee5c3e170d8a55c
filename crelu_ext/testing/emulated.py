"""The CUDA kernels run on the host, for tests: :func:`crelu`, and the backends
``emulated`` and ``emulated64`` that the test suite registers with
:func:`register_backends` (importing this module registers nothing, so users
never see them in ``crelu_ext.available_backends()``).

csrc/cuda/crelu_kernels.cuh compiles each kernel's per-thread body for host and
device. The grid emulator (csrc/testing/crelu_emulator.cu) runs, on CPU
tensors, the launch the GPU would get (same vectorized-or-scalar choice, offset
width and block count, for a GPU of 132 SMs), one (block, thread) after
another, and registers the result as the ops ``crelu_ext::emulated_crelu``,
``emulated_crelu_backward`` and ``emulated_crelu_backward_backward``; the
``emulated64_`` ops force 64-bit offsets. They live in a library of their own,
which only a test build makes (``CRELU_EXT_TESTING=1``; it needs the CUDA
toolkit, no GPU): a release build registers no such op.
"""

import functools
from pathlib import Path

import torch

from .. import _native
from .._autograd import call_forward, register_crelu_autograd
from .._checks import check_input
from .._vmap import register_vmap_rules
from ..functional import register_backend

LIBRARY = Path(__file__).resolve().with_name("libcrelu_ext_emulator.so")

# Op name prefix by index_bits: None keeps the launcher's choice.
OP_PREFIXES = {None: "emulated_", 64: "emulated64_"}


def _load() -> str | None:
    """Loads the emulator's library; the reason it is unavailable, if it is."""
    if _native.NATIVE_IMPORT_ERROR is not None:
        return f"the compiled extension did not load: {_native.NATIVE_IMPORT_ERROR}"
    if not LIBRARY.exists():
        return (
            f"this build of crelu_ext has no emulator ({LIBRARY} is missing): it is a test "
            "build's, made with CRELU_EXT_TESTING=1 and the CUDA toolkit (no GPU needed), "
            "e.g. CRELU_EXT_TESTING=1 pip install --no-build-isolation -e ."
        )
    try:
        torch.ops.load_library(str(LIBRARY))
    except OSError as error:
        return f"{LIBRARY} did not load: {error}"
    return None


UNAVAILABLE_REASON = _load()
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
        names = (f"{prefix}crelu", f"{prefix}crelu_backward", f"{prefix}crelu_backward_backward")
        register_crelu_autograd(*names)
        register_vmap_rules(*names)


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def register_backends() -> list[str]:
    """Makes ``crelu_ext.crelu(x, dim, backend="emulated")`` (and ``"emulated64"``,
    64-bit offsets forced) run the emulated CUDA kernels on CPU tensors, for the
    test suite's backend-parametrized tests; returns the names registered, none
    where the build has no emulator."""
    if not AVAILABLE:
        return []
    names = []
    for bits, prefix in OP_PREFIXES.items():
        name = prefix.rstrip("_")  # emulated, emulated64
        register_backend(name, functools.partial(crelu, index_bits=bits), _on_cpu)
        names.append(name)
    return names


if AVAILABLE:
    _register()
