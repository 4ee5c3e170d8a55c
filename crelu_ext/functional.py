"""Backend selection and the functional API.

``native``: the compiled kernels in csrc/ (CPU, and CUDA when built with it).
``triton``: the Triton kernels in crelu_ext/triton/ (CUDA; CPU in the interpreter).
``reference``: the torch composition in reference.py, available everywhere.
"""

import os

import torch

from . import _export, _native, reference
from . import triton as triton_backend
from ._layout import check_input

BACKENDS = ("native", "triton", "reference")
ENV_VAR = "CRELU_EXT_BACKEND"
# os.environ.get raises and catches a KeyError when the variable is unset, which
# costs more than the whole op at small sizes; os.environ's own dict, which it
# keeps up to date, answers the same without.
_ENVIRON_DATA = os.environ._data
_ENV_KEY = os.environ.encodekey(ENV_VAR)

_IMPLEMENTATIONS = {
    "native": _native.crelu,
    "triton": triton_backend.crelu,
    "reference": reference.crelu,
}
_REGISTERED = {}
_DEFAULT = [os.environ.get(ENV_VAR)]


def register_backend(name, implementation, is_available):
    global BACKENDS
    BACKENDS = (*BACKENDS, name)
    _IMPLEMENTATIONS[name] = implementation
    _REGISTERED[name] = is_available


def set_default_backend(name):
    previous = _DEFAULT[0]
    _DEFAULT[0] = name
    _SELECTED.clear()
    return "auto" if previous is None else previous


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that run on ``device`` (default: CPU), in the order
    ``backend="auto"`` prefers them."""
    device = torch.device("cpu" if device is None else device)
    available = []
    if _native.native_available(device):
        available.append("native")
    if triton_backend.triton_available(device):
        available.append("triton")
    available += [name for name, is_available in _REGISTERED.items() if is_available(device)]
    available.append("reference")
    return available


def select_backend(backend: str, device: torch.device) -> str:
    """Resolves ``backend`` for ``device``; ``"auto"`` takes ``$CRELU_EXT_BACKEND``
    if set, else the first available backend."""
    requested, origin = backend, "backend"
    if backend == "auto":
        requested, origin = _backend_override() or "auto", ENV_VAR
    available = available_backends(device)
    if requested == "auto":
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(
            f"crelu_ext.crelu: unknown {origin} {requested!r}; choose 'auto' or one of "
            f"{list(BACKENDS)} (available on {device.type}: {available})"
        )
    if requested not in available:
        reason = ""
        if requested == "native" and _native.NATIVE_IMPORT_ERROR is not None:
            reason = f" ({_native.native_unavailable_reason()})"
        elif requested == "triton" and triton_backend.TRITON_IMPORT_ERROR is not None:
            reason = f" (triton did not import: {triton_backend.TRITON_IMPORT_ERROR})"
        elif requested == "triton" and device.type == "cpu":
            reason = " (Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1)"
        raise RuntimeError(
            f"crelu_ext.crelu: {origin} {requested!r} is not available for {device.type} "
            f"tensors{reason}; available: {available}"
        )
    return requested


def _backend_override() -> str | None:
    """$CRELU_EXT_BACKEND, read on every call."""
    if _DEFAULT[0] not in (None, "auto"):
        return _DEFAULT[0]
    if torch.compiler.is_compiling():
        return os.environ.get(ENV_VAR)
    value = _ENVIRON_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


# (backend, $CRELU_EXT_BACKEND for "auto", device) -> the backend it resolves
# to: the available backends are fixed once the package has loaded. Keyed by
# the device, as reading its type builds a string on every call.
_SELECTED: dict[tuple[str, str | None, torch.device], str] = {}


def crelu(x: torch.Tensor, dim: int = 1, backend: str = "auto") -> torch.Tensor:
    """CReLU, ``cat([relu(x), relu(-x)], dim)``, bitwise equal to
    :func:`crelu_ext.reference.crelu` forward and backward, in one fused pass
    that saves only 2 bits per element for backward."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch alone
        return torch.ops.crelu_ext.crelu(x, dim, False)[0]
    return _crelu(x, dim, backend)


def _crelu(x: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    if not torch.compiler.is_dynamo_compiling() and _export.exporting():
        return reference.crelu(x, dim)  # standard ONNX ops, for either exporter
    override = _backend_override() if backend == "auto" else None
    try:
        key = (backend, override, x.device)
    except AttributeError:
        check_input(x, dim)  # not a tensor: the API's message
        raise
    selected = _SELECTED.get(key)
    if selected is None:
        # Raises for a backend unavailable on the device; one that resolves is kept.
        selected = _SELECTED[key] = select_backend(backend, x.device)
    # Each backend checks its input once (the native op in C++).
    return _IMPLEMENTATIONS[selected](x, dim)


def register_backend(name, implementation, is_available):
    """Placeholder: the real registration comes from another branch."""
    _IMPLEMENTATIONS[name] = implementation
