"""torch.compile traces the ops with no graph break and gives the eager bits."""

import pytest
import torch
from helpers import FORWARD_OPS, assert_bitwise_equal, backend_devices, make_input

import crelu_ext

# Interpreted Triton kernels are Python functions that torch.compile cannot trace.
traceable = pytest.mark.parametrize(
    "backend_device", backend_devices(include=lambda b, d: (b, d) != ("triton", "cpu"))
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def crelu_and_grad_of(fn, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    return out, grad_x


@traceable
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


@traceable
def test_compiled_module(backend_device):
    # The module between two ops that only move data, so every bit is the op's.
    backend, device = backend_device
    net = torch.nn.Sequential(
        torch.nn.Flatten(2), crelu_ext.CReLU(dim=-1, backend=backend), torch.nn.Flatten(1)
    )
    x = make_input((2, 3, 8, 8), torch.float32, device)
    with torch.no_grad():
        assert_bitwise_equal(torch.compile(net, fullgraph=True)(x), net(x))


def crelu_ext_ops(graph: torch.fx.GraphModule) -> set[str]:
    """The crelu_ext ops the graph calls, by name (an op prints as
    ``crelu_ext.name`` or ``crelu_ext.name.overload``)."""
    names = (str(node.target).split(".") for node in graph.graph.nodes)
    return {name[1] for name in names if name[0] == "crelu_ext"}


@traceable
def test_one_graph_holds_the_backends_op(backend_device):
    """Dynamo captures the call in one graph, as the backend's op (the reference
    as its composition), and the graph gives eager's bits forward and backward."""
    backend, device = backend_device
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def fn(t):
        return crelu_ext.crelu(t, -1, backend=backend)

    compiled = torch.compile(fn, backend=record)
    x = make_input((2, 4, 3, 3), torch.float32, device)
    grad = make_input((2, 4, 3, 6), torch.float32, device, seed=1)
    out, grad_x = crelu_and_grad_of(compiled, x, grad)
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break"
    expected = {FORWARD_OPS[backend]} if backend in FORWARD_OPS else set()
    assert crelu_ext_ops(graphs[0]) == expected
    eager_out, eager_grad = crelu_and_grad_of(fn, x, grad)
    assert_bitwise_equal(out, eager_out, "forward")
    assert_bitwise_equal(grad_x, eager_grad, "backward")
