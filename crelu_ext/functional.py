"""The functional API and the backends it runs.

``native``: the compiled kernels in csrc/ (CPU, and CUDA when built with it).
``triton``: the Triton kernels in crelu_ext/triton/ (CUDA; CPU in the interpreter).
``reference``: the torch composition in reference.py, available everywhere.
More can be added with :func:`register_backend`.

``backend="auto"`` picks native, else triton, else reference. The environment
variable ``CRELU_EXT_BACKEND``, read once when crelu_ext is imported, names the
backend that ``"auto"`` means instead; :func:`set_default_backend` changes it
at run time.
"""

import os
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _export, _native, reference
from . import triton as triton_backend
from ._checks import check_input

ENV_VAR = "CRELU_EXT_BACKEND"
DEFAULT_DIM = 1  # the channels of NCHW input
BACKENDS = ("native", "triton", "reference")  # the built-in ones
AUTO_ORDER = ("native", "triton")  # what "auto" picks, else the reference


Implementation = Callable[[torch.Tensor, int], torch.Tensor]


class Backend(NamedTuple):
    implementation: Implementation  # what tracers see
    is_available: Callable[[torch.device], bool]
    eager_implementation: Implementation  # what eager mode calls


# By name, in registration order: the built-ins first, so that "auto" prefers
# them; available_backends lists the reference last.
_BACKENDS: dict[str, Backend] = {}

# (backend argument, device, traced) -> the implementation it resolves to. The
# backends available for a device are fixed once the package has loaded, and
# the key holds the device itself, as reading its type builds a string.
_RESOLVED: dict[tuple[str, torch.device, bool], Implementation] = {}

# What "auto" means: "auto" for the first available backend, else a name.
_default = os.environ.get(ENV_VAR, "auto")
_default_origin = ENV_VAR
_warned_fallback = False


def register_backend(
    name: str,
    implementation: Implementation,
    is_available: Callable[[torch.device], bool],
    *,
    eager_implementation: Implementation | None = None,
) -> None:
    """Makes ``crelu(x, dim, backend=name)`` run ``implementation(x, dim)`` on
    the devices for which ``is_available(device)`` is true. ``available_backends``
    lists it after native and triton and before the reference, and ``"auto"``
    never picks it, as the reference is always there. Registering a name again
    replaces its implementation.

    ``eager_implementation``, if given, runs instead outside tracers: a faster
    call that torch.compile, torch.export and torch.jit.trace need not see."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"crelu_ext.register_backend: invalid backend name {name!r}")
    _BACKENDS[name] = Backend(implementation, is_available, eager_implementation or implementation)
    _RESOLVED.clear()


def _device_exists(device: torch.device) -> bool:
    """Whether tensors can live on ``device`` in this process: an accelerator
    that torch has no device for (CUDA on a machine without a GPU) holds none."""
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if device.type in ("cpu", "meta") or is_available is None:
        return True
    if not is_available():
        return False
    return device.index is None or device.index < module.device_count()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that run tensors on ``device`` (default: CPU), in the order
    ``backend="auto"`` prefers them, the reference last. Empty for a device this
    process has none of, e.g. ``"cuda"`` where CUDA is not available."""
    device = torch.device("cpu" if device is None else device)
    if not _device_exists(device):
        return []
    available = [
        name
        for name, backend in _BACKENDS.items()
        if name != "reference" and backend.is_available(device)
    ]
    available.append("reference")
    return available


def _unavailable_reason(name: str, device: torch.device) -> str:
    if name == "native" and _native.NATIVE_IMPORT_ERROR is not None:
        return f" ({_native.native_unavailable_reason()})"
    if name == "triton" and triton_backend.TRITON_IMPORT_ERROR is not None:
        return f" (triton did not import: {triton_backend.TRITON_IMPORT_ERROR})"
    if name == "triton" and device.type == "cpu":
        return " (Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1)"
    return ""


def _check_name(name: str, origin: str, device: torch.device | None = None) -> None:
    if isinstance(name, str) and (name == "auto" or name in _BACKENDS):
        return
    where = "" if device is None else f" (available on {device.type}: {available_backends(device)})"
    raise ValueError(
        f"crelu_ext.crelu: unknown {origin} {name!r}; choose 'auto' or one of "
        f"{list(_BACKENDS)}{where}"
    )


def check_backend_name(backend: str) -> None:
    """Raises the error ``crelu(x, backend=backend)`` gives a CPU tensor when
    ``backend`` names no backend; for modules, which learn their device later."""
    _check_name(backend, "backend", torch.device("cpu"))


def set_default_backend(backend: str) -> str:
    """Sets the backend that ``backend="auto"`` means, overriding
    ``$CRELU_EXT_BACKEND``; ``"auto"`` restores the first available one.
    Returns the previous setting."""
    global _default, _default_origin
    _check_name(backend, "backend")
    previous, _default, _default_origin = _default, backend, "backend"
    _RESOLVED.clear()
    return previous


# Where the op's calls pass on their way in: this package's own modules (not
# its subpackages, whose commands are callers), the forwards that crelu_ext.fuse
# generates, and torch.nn's module calls (Module.__call__, Sequential, ...).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_MODULES_DIR = os.path.dirname(os.path.abspath(torch.nn.Module.__call__.__code__.co_filename))
_FUSED_FORWARD_PREFIX = "<crelu_ext.fuse "


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls this one, of
    the first frame outside the op's way in: the user's line, whether it called
    ``crelu``, a ``CReLU``, a model holding one or a fused model."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        filename = frame.f_code.co_filename
        inside = filename.startswith(_FUSED_FORWARD_PREFIX) or os.path.dirname(
            os.path.abspath(filename)
        ) in (_PACKAGE_DIR, _TORCH_MODULES_DIR)
        if not inside:
            break
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback and not torch.compiler.is_compiling():  # no global write in a trace
        _warned_fallback = True
        warnings.warn(
            "crelu_ext.crelu: running the reference composition (four kernels, two saved "
            f"activations) on CPU, as {_native.native_unavailable_reason()}",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )


def select_backend(backend: str, device: torch.device) -> str:
    """Resolves ``backend`` for ``device``; ``"auto"`` takes the default
    (:func:`set_default_backend`, ``$CRELU_EXT_BACKEND``) if one is set, else
    the first available backend."""
    requested, origin = backend, "backend"
    if backend == "auto":
        requested, origin = _default, _default_origin
    _check_name(requested, origin, device)
    available = available_backends(device)
    if not available:
        raise RuntimeError(
            f"crelu_ext.crelu: no backend runs {device} tensors: this process has no "
            f"{device} device"
        )
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in available:
                return name
        if device.type == "cpu" and _native.NATIVE_IMPORT_ERROR is not None:
            _warn_fallback()
        return "reference"
    if requested not in available:
        raise RuntimeError(
            f"crelu_ext.crelu: {origin} {requested!r} is not available for {device.type} "
            f"tensors{_unavailable_reason(requested, device)}; available: {available}"
        )
    return requested


def _resolve(x: torch.Tensor, dim: int, backend: str, traced: bool) -> Implementation:
    """The cache's miss: raises for a non-tensor (the API's message) and for a
    backend that is unknown or unavailable; keeps one that resolves, except
    inside a Dynamo trace, which must write no global state (strict
    torch.export reports it as a side effect of the model)."""
    if not isinstance(x, torch.Tensor):
        check_input(x, dim)
    resolved = _BACKENDS[select_backend(backend, x.device)]
    implementation = resolved.implementation if traced else resolved.eager_implementation
    if not torch.compiler.is_compiling():
        _RESOLVED[backend, x.device, traced] = implementation
    return implementation


def _default_dim_error(error: IndexError) -> IndexError:
    return IndexError(
        f"{error}; {DEFAULT_DIM} is the default dim of crelu_ext.crelu and CReLU (the channels "
        "of NCHW input): pass dim=... for other layouts, e.g. dim=-1 for (batch, features)"
    )


def crelu(x: torch.Tensor, dim: int = 1, backend: str = "auto") -> torch.Tensor:
    """CReLU, ``cat([relu(x), relu(-x)], dim)``, bitwise equal to
    :func:`crelu_ext.reference.crelu` forward and backward, in one fused pass
    that saves only 2 bits per element for backward.

    ``backend``: ``"auto"`` (native, else triton, else reference; see
    :func:`set_default_backend` and ``$CRELU_EXT_BACKEND``) or the name of one
    in :func:`available_backends`."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch alone
        return torch.ops.crelu_ext.crelu(x, dim, False)[0]
    return call_backend(x, dim, backend)


def call_backend(x: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    """What ``crelu`` and ``CReLU`` run outside TorchScript: the backend that
    ``backend`` resolves to for ``x``'s device, its eager implementation in
    eager mode and its traced one under a tracer."""
    # The one check for every tracer: torch.compile and torch.export (strict or
    # not) set is_compiling, torch.jit.trace is_tracing, and both ONNX
    # exporters run the model under one of them.
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if traced and _export.exporting():
        return reference.crelu(x, dim)  # standard ONNX ops, for either exporter
    try:
        implementation = _RESOLVED[backend, x.device, traced]
    except (KeyError, AttributeError, TypeError):
        implementation = _resolve(x, dim, backend, traced)
    try:
        # Each backend checks its input once (the native op in C++).
        return implementation(x, dim)
    except IndexError as error:
        if dim != DEFAULT_DIM:
            raise
        raise _default_dim_error(error) from None


register_backend(
    "native",
    _native.crelu,
    _native.native_available,
    eager_implementation=_native.crelu_through_binding,
)
register_backend("triton", triton_backend.crelu, triton_backend.triton_available)
register_backend("reference", reference.crelu, lambda device: True)
