import os

import pytest
from helpers import backend_devices

import crelu_ext
from crelu_ext import _native
from crelu_ext.testing import emulated


def pytest_configure(config):
    # The backend-parametrized tests are generated only for what runs here, so
    # a build that lacks what CI requires would shrink the suite, not fail it.
    native = "native" in crelu_ext.available_backends("cpu")
    if os.environ.get("CRELU_EXT_REQUIRE_NATIVE") == "1" and not native:
        raise pytest.UsageError(
            "CRELU_EXT_REQUIRE_NATIVE=1, but the native CPU kernels are not available: "
            f"{_native.native_unavailable_reason()}"
        )
    if os.environ.get("CRELU_EXT_CUDA") == "1" and not emulated.AVAILABLE:
        raise pytest.UsageError(
            "CRELU_EXT_CUDA=1, but the build has no emulated CUDA kernels: "
            f"{emulated.UNAVAILABLE_REASON}"
        )


@pytest.fixture(params=backend_devices())
def backend_device(request):
    """(backend, device), for every pair that runs here (helpers.BACKEND_DEVICES)."""
    return request.param


@pytest.fixture(autouse=True)
def _auto_is_the_default_backend():
    # Tests choose backends explicitly; a default set by the caller's
    # $CRELU_EXT_BACKEND would silently change what "auto" means.
    previous = crelu_ext.set_default_backend("auto")
    yield
    crelu_ext.set_default_backend(previous)
