"""What is particular to the CUDA kernels run on the host (crelu_ext/testing/emulated.py):
the mask bytes they share with the CPU kernels, the launch decisions, the
grid-stride loop. Parity, strides, autograd and errors run on them in the
backend-parametrized suites (emulated-cpu, emulated64-cpu)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_bitwise_equal, make_input

from crelu_ext.testing import emulated as _emulated

NATIVE = torch.ops.crelu_ext
OP_NAMES = ("crelu", "crelu_backward", "crelu_backward_backward")
# The launch the emulator plans (csrc/cuda/crelu_cuda.cu): 8 elements per
# thread, 256 threads per block, at most 32 blocks per SM on 132 SMs.
UNIT, THREADS, MAX_BLOCKS = 8, 256, 32 * 132
INT32_MAX = 2**31 - 1

# A build with CRELU_EXT_CUDA=1 must have them: conftest.py fails the session otherwise.
if not _emulated.AVAILABLE:
    pytest.skip(
        f"no emulated CUDA kernels: {_emulated.UNAVAILABLE_REASON}", allow_module_level=True
    )


@pytest.fixture(params=list(_emulated.OP_PREFIXES.values()))
def emulated_ops(request):
    prefix = request.param
    return SimpleNamespace(
        prefix=prefix, **{name: getattr(NATIVE, prefix + name) for name in OP_NAMES}
    )


def test_schemas_are_the_native_ones(emulated_ops):
    for name in OP_NAMES:
        native = getattr(NATIVE, name).default
        emulated = getattr(emulated_ops, name).default
        assert str(emulated._schema) == str(native._schema).replace(
            f"crelu_ext::{name}(", f"crelu_ext::{emulated_ops.prefix}{name}("
        )
        assert emulated.tags == native.tags


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    differ = (actual != expected).nonzero().flatten().tolist()
    assert actual.shape == expected.shape and not differ, f"{what}: bytes {differ[:8]} differ"


# numel % 32 == 0 (whole mask blocks), a multiple of 8 (whole units) or
# neither (a tail unit); rows of multiples of 8 take the vector path.
SHAPE_DIMS = [
    ((4, 64), 1),
    ((3, 40), 1),
    ((2, 5, 16), 2),
    ((3, 37), 1),
    ((7,), 0),
    ((2, 3, 11), 0),
    ((1, 33), 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "dim"), SHAPE_DIMS, ids=str)
def test_mask_interchanges_with_the_cpu_kernels(emulated_ops, shape, dim, dtype):
    # One mask contract (csrc/crelu.h), so the same bytes, padding included:
    # each device's backward reads the other's mask.
    x = make_input(shape, dtype)
    out, mask = emulated_ops.crelu(x, dim, True)
    native_out, native_mask = NATIVE.crelu(x, dim, True)
    assert_bitwise_equal(out, native_out, "forward")
    assert_same_bytes(mask, native_mask, "mask")
    fmt = torch.contiguous_format
    grad_out = make_input(out.shape, dtype, seed=1)
    expected = NATIVE.crelu_backward(grad_out, native_mask, dim, fmt)
    assert_bitwise_equal(
        NATIVE.crelu_backward(grad_out, mask, dim, fmt), expected, "CPU backward, emulated mask"
    )
    assert_bitwise_equal(
        emulated_ops.crelu_backward(grad_out, native_mask, dim, fmt),
        expected,
        "emulated backward, CPU mask",
    )
    grad_x = make_input(shape, dtype, seed=2)
    expected = NATIVE.crelu_backward_backward(grad_x, native_mask, dim, fmt)
    assert_bitwise_equal(
        NATIVE.crelu_backward_backward(grad_x, mask, dim, fmt),
        expected,
        "CPU double backward, emulated mask",
    )
    assert_bitwise_equal(
        emulated_ops.crelu_backward_backward(grad_x, native_mask, dim, fmt),
        expected,
        "emulated double backward, CPU mask",
    )


@pytest.mark.parametrize(
    ("numel", "inner", "aligned", "force_64bit", "expected"),
    [
        (1024, 1024, True, False, (True, 32, 1)),  # 128 units: one block
        (1024, 1024, True, True, (True, 64, 1)),
        (1024, 1024, False, False, (False, 32, 1)),  # a misaligned pointer
        (1020, 12, True, False, (False, 32, 1)),  # rows not a multiple of 8
        (THREADS * UNIT * 5 + 1, 8, True, False, (True, 32, 6)),
        (INT32_MAX // 2, 8, True, False, (True, 32, MAX_BLOCKS)),  # 2 * numel fits
        (INT32_MAX // 2 + 1, 8, True, False, (True, 64, MAX_BLOCKS)),
        (2**40, 2**33, True, False, (True, 64, MAX_BLOCKS)),
    ],
)
def test_launch_decisions(numel, inner, aligned, force_64bit, expected):
    assert NATIVE.emulated_launch_plan(numel, inner, aligned, force_64bit) == expected


@pytest.mark.parametrize("path", ["vector", "scalar"])
def test_the_grid_stride_loop_takes_several_steps(emulated_ops, path):
    # More units than the largest grid has threads: every thread loops.
    numel = MAX_BLOCKS * THREADS * UNIT + 800 + 5
    shape = (numel,) if path == "scalar" else (5, (numel + 39) // 40 * 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float16)
    vectorized, _, blocks = NATIVE.emulated_launch_plan(x.numel(), shape[-1], True, False)
    assert vectorized == (path == "vector") and blocks == MAX_BLOCKS
    out, mask = emulated_ops.crelu(x, -1, True)
    native_out, native_mask = NATIVE.crelu(x, -1, True)
    assert_bitwise_equal(out, native_out, "forward")
    assert_same_bytes(mask, native_mask, "mask")
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float16)
    assert_bitwise_equal(
        emulated_ops.crelu_backward(grad_out, mask, -1, torch.contiguous_format),
        NATIVE.crelu_backward(grad_out, mask, -1, torch.contiguous_format),
        "backward",
    )


def test_the_emulated_ops_check_their_mask(emulated_ops):
    _, mask = emulated_ops.crelu(torch.ones(4, 64), 1, True)
    fmt = torch.contiguous_format
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward: expected the uint8 mask"):
        emulated_ops.crelu_backward(torch.ones(4, 64), mask, 1, fmt)
    misaligned = torch.empty(mask.numel() + 1, dtype=torch.uint8)[1:]
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward: the mask must start on"):
        emulated_ops.crelu_backward(torch.ones(4, 128), misaligned, 1, fmt)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward_backward: expected the"):
        emulated_ops.crelu_backward_backward(torch.ones(4, 65), mask, 1, fmt)


def test_rejects_what_it_cannot_emulate():
    with pytest.raises(
        ValueError, match=r"crelu_ext\.testing\.emulated\.crelu: index_bits must be"
    ):
        _emulated.crelu(torch.ones(2, 8), 1, index_bits=32)
    with pytest.raises(
        ValueError, match=r"crelu_ext\.testing\.emulated\.crelu: expected a CPU tensor"
    ):
        _emulated.crelu(torch.ones(2, 8, device="meta"), 1)
