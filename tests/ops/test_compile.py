"""torch.compile traces the ops with no graph break and gives the eager bits."""

import pytest
import torch
from helpers import assert_bitwise_equal, crelu_and_grad, make_input

import crelu_ext


@pytest.fixture
def backend_device(backend_device):
    if backend_device == ("triton", "cpu"):
        pytest.skip(
            "interpreted Triton kernels are Python functions that torch.compile cannot trace"
        )
    return backend_device


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_dynamic_forward_and_backward(backend_device):
    backend, device = backend_device

    def fn(x):
        return crelu_ext.crelu(x, 1, backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for shape in [(2, 8, 5, 5), (3, 4, 7, 2)]:  # a second shape: no recompile per size
        x = make_input(shape, torch.float32, device)
        grad = make_input((shape[0], 2 * shape[1], *shape[2:]), torch.float32, device, seed=1)
        eager_out, eager_grad = crelu_and_grad_of(fn, x, grad)
        out, grad_x = crelu_and_grad_of(compiled, x, grad)
        assert_bitwise_equal(out, eager_out, "forward")
        assert_bitwise_equal(grad_x, eager_grad, "backward")


def crelu_and_grad_of(fn, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    return out, grad_x


def test_compiled_module(backend_device):
    # The module between two ops that only move data, so every bit is the op's.
    backend, device = backend_device
    net = torch.nn.Sequential(
        torch.nn.Flatten(2), crelu_ext.CReLU(dim=-1, backend=backend), torch.nn.Flatten(1)
    )
    x = make_input((2, 3, 8, 8), torch.float32, device)
    with torch.no_grad():
        assert_bitwise_equal(torch.compile(net, fullgraph=True)(x), net(x))


def test_no_graph_break_counts(backend_device):
    backend, device = backend_device
    x = make_input((2, 4, 3, 3), torch.float32, device)
    explanation = torch._dynamo.explain(lambda t: crelu_ext.crelu(t, -1, backend=backend))(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    assert crelu_and_grad(x, -1, torch.ones(2, 4, 3, 6, device=device), backend)
