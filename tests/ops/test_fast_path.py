"""The eager fast path, crelu_ext._C.crelu: the same op as
torch.ops.crelu_ext.crelu, called without torch.ops' per-call argument parsing.
Its results, gradients, errors and what tracers and the profiler see must be
the torch.ops call's."""

import pytest
import torch
from helpers import assert_bitwise_equal, make_input

import crelu_ext
from crelu_ext import _native

pytestmark = pytest.mark.skipif(
    _native.NATIVE_IMPORT_ERROR is not None, reason="crelu_ext._C is not built"
)


def through_torch_ops(x, dim):
    return torch.ops.crelu_ext.crelu.default(x, dim, False)[0]


def through_fast_path(x, dim):
    return _native._C.crelu(x, dim)


CASES = [
    ((4, 256), -1, torch.contiguous_format),
    ((1, 16, 8, 8), 1, torch.contiguous_format),
    ((2, 6, 5, 3), 1, torch.channels_last),
    ((3, 0, 4), 2, torch.contiguous_format),
    ((7, 5), 0, torch.contiguous_format),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "dim", "memory_format"), CASES, ids=str)
def test_outputs_and_gradients_are_the_torch_ops_calls(shape, dim, memory_format, dtype):
    x = make_input(shape, dtype).contiguous(memory_format=memory_format)
    grad = make_input(through_torch_ops(x, dim).shape, dtype, seed=1)
    results = []
    for call in (through_torch_ops, through_fast_path):
        leaf = x.clone().requires_grad_()
        out = call(leaf, dim)
        (grad_x,) = torch.autograd.grad(out, leaf, grad)
        results.append((out, grad_x))
    (expected_out, expected_grad), (out, grad_x) = results
    assert_bitwise_equal(out, expected_out, "forward")
    assert out.stride() == expected_out.stride()
    assert_bitwise_equal(grad_x, expected_grad, "backward")


def test_writes_the_mask_only_under_autograd():
    # save_mask=False: the autograd kernel asks for the mask when it records
    # the call, and only then.
    x = torch.randn(4, 8, requires_grad=True)
    assert through_fast_path(x, 1).grad_fn.name() == "CreluBackward0"
    with torch.no_grad():
        assert through_fast_path(x, 1).grad_fn is None


@pytest.mark.parametrize(
    ("x", "dim", "error"),
    [
        (torch.ones(3, dtype=torch.int64), 0, TypeError),
        (torch.ones(2, 3), 2, IndexError),
        (torch.tensor(1.0), 0, RuntimeError),
    ],
    ids=["dtype", "dim", "0-dim"],
)
def test_errors_are_the_torch_ops_calls(x, dim, error):
    with pytest.raises(error) as expected:
        through_torch_ops(x, dim)
    with pytest.raises(error) as raised:
        through_fast_path(x, dim)
    assert type(raised.value) is type(expected.value)
    assert str(raised.value) == str(expected.value)
    assert "crelu_ext.crelu" in str(raised.value)


def test_the_public_api_takes_the_fast_path_in_eager_mode(monkeypatch):
    calls = []

    def recording(x, dim):
        calls.append(dim)
        return torch.ops.crelu_ext.crelu.default(x, dim, False)[0]

    class Dim(int):
        pass

    monkeypatch.setattr(_native._C, "crelu", recording)
    x = torch.randn(2, 3)
    crelu_ext.crelu(x, 1, backend="native")
    assert calls == [1]
    # Not a plain tensor or not an int dim: the torch.ops call.
    crelu_ext.crelu(torch.nn.Parameter(x), 1, backend="native")
    crelu_ext.crelu(x, Dim(1), backend="native")
    # Traced (without the eager rerun that checks the trace): the torch.ops
    # call, which the tracer records.
    traced = torch.jit.trace(
        lambda x: crelu_ext.crelu(x, 1, backend="native"), x, check_trace=False
    )
    assert "crelu_ext::crelu" in str(traced.graph)
    assert calls == [1]


def test_the_profiler_records_the_op():
    x = torch.randn(4, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        through_fast_path(x, -1)
    names = [event.name for event in prof.events()]
    assert "crelu_ext::crelu" in names, names


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_records_the_op():
    traced = torch.jit.trace(lambda x: through_fast_path(x, 1), torch.randn(2, 3))
    assert "crelu_ext::crelu" in str(traced.graph), traced.graph
    x = make_input((3, 5), torch.float32)
    assert_bitwise_equal(traced(x), through_torch_ops(x, 1), "traced")


def test_compile_sees_the_op():
    counts = []

    def backend(graph_module, example_inputs):
        counts.append(str(graph_module.graph).count("crelu_ext.crelu"))
        return graph_module

    compiled = torch.compile(lambda x: crelu_ext.crelu(x, 1, backend="native"), backend=backend)
    x = torch.randn(2, 3)
    assert_bitwise_equal(compiled(x), through_torch_ops(x, 1), "compiled")
    assert counts == [1], counts
