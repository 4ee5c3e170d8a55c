"""The package as built and installed: native kernels present where CI
requires them, and a clean import without the compiled part."""

import os
import subprocess
import sys

import pytest
import torch

import crelu_ext
from crelu_ext import ops


@pytest.mark.skipif(
    os.environ.get("CRELU_EXT_REQUIRE_NATIVE") != "1",
    reason="set CRELU_EXT_REQUIRE_NATIVE=1 to require the compiled kernels (CI does)",
)
def test_native_kernels_are_built():
    assert ops.NATIVE_IMPORT_ERROR is None, ops.NATIVE_IMPORT_ERROR
    assert crelu_ext.available_backends("cpu")[0] == "native"
    if torch.cuda.is_available() or os.environ.get("CRELU_EXT_CUDA") == "1":
        assert torch._C._dispatch_has_kernel_for_dispatch_key("crelu_ext::crelu", "CUDA")


def test_imports_and_falls_back_without_the_compiled_part():
    # Hide crelu_ext._C as if the build had been skipped.
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "crelu_ext._C":
            raise ImportError("hidden by the test")
sys.meta_path.insert(0, Hide())
import torch, crelu_ext
assert crelu_ext.available_backends("cpu") == ["reference"], crelu_ext.available_backends()
x = torch.randn(2, 3)
assert torch.equal(crelu_ext.crelu(x), crelu_ext.reference.crelu(x))
try:
    crelu_ext.crelu(x, backend="native")
except RuntimeError as e:
    assert "did not load" in str(e) and "hidden by the test" in str(e), e
else:
    raise AssertionError("native should be unavailable")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch, crelu_ext
assert "triton" not in crelu_ext.available_backends("cpu")
try:
    crelu_ext.crelu(torch.randn(2, 3), backend="triton")
except RuntimeError as e:
    assert "triton did not import" in str(e), e
else:
    raise AssertionError("triton should be unavailable")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
