"""What tools/cuda_codegen.py flags, on made-up kernels (CI runs it on
the real build: make codegen-check)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "tools" / "cuda_codegen.py"
spec = importlib.util.spec_from_file_location("cuda_codegen", SCRIPT)
cuda_codegen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_codegen)
Kernel = cuda_codegen.Kernel

VECTOR = "_ZN9crelu_ext12crelu_kernelINS_11ForwardBodyIfjNS_12VectorAccessEEEEEvv"
SCALAR = "_ZN9crelu_ext12crelu_kernelINS_11ForwardBodyIfjNS_12ScalarAccessEEEEEvv"


@pytest.mark.parametrize(
    ("kernels", "expected"),
    [
        ([Kernel("sm_90", VECTOR, 32, loads_128=4, stores_128=8), Kernel("sm_90", SCALAR, 32)], []),
        ([Kernel("sm_90", VECTOR, 32, loads_128=0, stores_128=8)], ["no 128-bit global load"]),
        ([Kernel("sm_90", VECTOR, 32, loads_128=4, stores_128=0)], ["no 128-bit global store"]),
        ([Kernel("sm_90", VECTOR, 32, loads_128=1, stores_128=1),
          Kernel("sm_90", SCALAR, 40, stack_bytes=8)], ["uses local memory"]),
        ([Kernel("sm_80", SCALAR, 32, local_accesses=2)],
         ["sm_80: no vectorized kernel", "uses local memory"]),
        ([], ["no CUDA kernels"]),
    ],
)  # fmt: skip
def test_check_flags(monkeypatch, kernels, expected):
    monkeypatch.setattr(cuda_codegen, "read_kernels", lambda so_path: kernels)
    monkeypatch.setattr(cuda_codegen, "readable_names", lambda ks: {k.name: k.name for k in ks})
    violations = cuda_codegen.check("made-up.so")
    assert len(violations) == len(expected), violations
    for violation, phrase in zip(violations, expected, strict=True):
        assert phrase in violation
