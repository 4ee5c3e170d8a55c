"""The native ops (csrc/): the compiled library, loaded with the Python module
crelu_ext._C, and their fake kernels and batching rules (_vmap.py), registered on
the schemas that csrc/ops.cpp defines; autograd is registered in C++
(csrc/autograd.cpp)."""

import importlib
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._checks import check_input
from ._layout import allocate_backward, allocate_backward_backward, allocate_forward
from ._vmap import register_vmap_rules

PACKAGE_DIR = Path(__file__).resolve().parent

try:
    # Loading it loads the op library next to it (libcrelu_ext_ops.so), whose
    # registrations make torch.ops.crelu_ext.*.
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as error:  # no compiled part: only the reference backend
    NATIVE_IMPORT_ERROR: ImportError | None = error
else:
    NATIVE_IMPORT_ERROR = None


def _built_copies_elsewhere() -> list[Path]:
    """Other crelu_ext packages on sys.path that hold a compiled _C."""
    copies = []
    for entry in sys.path:
        package = Path(entry or ".").resolve() / "crelu_ext"
        if package != PACKAGE_DIR and any(package.glob("_C.*")):
            copies.append(package)
    return copies


def native_unavailable_reason() -> str:
    """Why the native backend did not load, and how to get it."""
    missing = isinstance(NATIVE_IMPORT_ERROR, ModuleNotFoundError) and (
        NATIVE_IMPORT_ERROR.name == f"{__package__}._C"
    )
    if not missing:
        return f"the compiled extension did not load: {NATIVE_IMPORT_ERROR}"
    reason = f"the package imported from {PACKAGE_DIR} has no compiled part (crelu_ext._C)"
    copies = _built_copies_elsewhere()
    if copies:
        reason += (
            f", while a built copy is installed at {copies[0]}: running from the source "
            "checkout imports the source folder instead. Run from outside the checkout, "
            "or build in place with `pip install -e .`"
        )
    else:
        reason += "; build it in place with `pip install -e .` (or `pip install .` and run "
        reason += "from outside the checkout)"
    return reason


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
    """The native forward as tracers (torch.compile, torch.export, torch.jit.trace)
    see it: torch.ops.crelu_ext.crelu. The op checks its input and, under
    autograd, writes the mask that the backward needs (csrc/autograd.cpp)."""
    try:
        return torch.ops.crelu_ext.crelu.default(x, dim, False)[0]
    except (TypeError, RuntimeError) as error:
        # The Python API's message for a non-tensor, a non-int dim, a dtype or a layout.
        _raise_python_error(x, dim, error)


def crelu_through_binding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The same op outside tracers, through _C.crelu, which skips torch.ops'
    per-call argument parsing; tensor subclasses (whose __torch_function__ or
    __torch_dispatch__ must see torch.ops) and non-int dims take torch.ops."""
    if type(x) is torch.Tensor and type(dim) is int:
        try:
            return _C.crelu(x, dim)
        except (TypeError, RuntimeError) as error:
            _raise_python_error(x, dim, error)  # for a dtype, a layout
    return crelu(x, dim)


def _raise_python_error(x: Any, dim: Any, error: Exception) -> NoReturn:
    """Raises :func:`check_input`'s error for what the op refused, alone (the
    dispatcher's error for a sparse tensor, say, is long and names no fix); else
    ``error``. Runs only once the op has failed."""
    try:
        check_input(x, dim)
    except (TypeError, RuntimeError, IndexError) as clear:
        raise clear from None
    raise error


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
    register_vmap_rules("crelu", "crelu_backward", "crelu_backward_backward")


if NATIVE_IMPORT_ERROR is None:
    _register()
