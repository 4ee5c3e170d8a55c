import os

import pytest
import torch

import crelu_ext

# Backends under test on each device. A combination that cannot run here is
# skipped with the reason; CI requires the native CPU kernels separately
# (test_build.py), so a broken build cannot hide behind a skip.
# triton-cpu runs in Triton's interpreter: `TRITON_INTERPRET=1 pytest -k triton-cpu`.
BACKEND_DEVICES = [
    ("native", "cpu"),
    ("triton", "cpu"),
    ("reference", "cpu"),
    ("native", "cuda"),
    ("triton", "cuda"),
    ("reference", "cuda"),
]


def _param(backend, device):
    marks = [pytest.mark.cuda] if device == "cuda" else []
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


@pytest.fixture(params=[_param(b, d) for b, d in BACKEND_DEVICES])
def backend_device(request):
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in crelu_ext.available_backends(device):
        pytest.skip(f"{backend} is not available on {device}")
    return backend, device


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose backends explicitly; an override in the caller's shell would
    # silently change what "auto" means.
    if "CRELU_EXT_BACKEND" in os.environ:
        monkeypatch.delenv("CRELU_EXT_BACKEND")
