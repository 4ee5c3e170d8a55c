import functools

import pytest
import torch

import crelu_ext
from crelu_ext.testing import emulated as _emulated

# Backends under test on each device. A combination that cannot run here is
# skipped with the reason; CI requires the native CPU kernels separately
# (test_build.py), so a broken build cannot hide behind a skip.
# triton-cpu runs in Triton's interpreter: `TRITON_INTERPRET=1 pytest -k triton-cpu`.
# emulated-cpu runs the CUDA kernels' code on the host (crelu_ext/testing/emulated.py),
# emulated64-cpu the same with 64-bit offsets forced; tests reach them through
# crelu_ext.crelu(x, dim, backend=...) like any other backend.
BACKEND_DEVICES = [
    ("native", "cpu"),
    ("triton", "cpu"),
    ("reference", "cpu"),
    ("emulated", "cpu"),
    ("emulated64", "cpu"),
    ("native", "cuda"),
    ("triton", "cuda"),
    ("reference", "cuda"),
]


def _param(backend, device):
    marks = [pytest.mark.cuda] if device == "cuda" else []
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


# The private backends, by name: their index_bits for crelu_ext.testing.emulated.crelu.
EMULATED_INDEX_BITS = {"emulated": None, "emulated64": 64}


def add_test_backend(name, implementation):
    """Lets crelu_ext.crelu(x, dim, backend=name), and CReLU(backend=name), run
    implementation(x, dim) on CPU tensors."""
    crelu_ext.register_backend(name, implementation, lambda device: device.type == "cpu")


@pytest.fixture(params=[_param(b, d) for b, d in BACKEND_DEVICES])
def backend_device(request):
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend in EMULATED_INDEX_BITS:
        if not _emulated.AVAILABLE:
            pytest.skip(f"no emulated CUDA kernels: {_emulated.UNAVAILABLE_REASON}")
        index_bits = EMULATED_INDEX_BITS[backend]
        add_test_backend(backend, functools.partial(_emulated.crelu, index_bits=index_bits))
        return backend, device
    if backend not in crelu_ext.available_backends(device):
        pytest.skip(f"{backend} is not available on {device}")
    return backend, device


@pytest.fixture(autouse=True)
def _no_backend_override():
    # Tests choose backends explicitly; an override in the caller's shell
    # ($CRELU_EXT_BACKEND) would silently change what "auto" means.
    crelu_ext.set_default_backend("auto")
