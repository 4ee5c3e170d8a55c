"""CUDA-only behaviour: streams, graphs, devices, determinism, 64-bit
indexing. Parity on CUDA tensors runs in the backend-parametrized suites."""

import pytest
import torch
from helpers import assert_bitwise_equal, crelu_and_grad, make_input

import crelu_ext
from crelu_ext.testing import emulated as _emulated

# The one reason these tests skip, as marks, so that a machine without a GPU still
# collects them: tools/emulator_vs_gpu.py checks, in the GPU check's dry run, that the
# emulator-vs-GPU test is collected and that nothing but a missing GPU skips it.
NO_GPU = "no CUDA device"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


@pytest.fixture(params=[b for b in crelu_ext.available_backends("cuda") if b != "reference"])
def cuda_backend(request):
    return request.param


def test_cuda_graph_capture_and_replay(cuda_backend):
    x = make_input((4, 64, 8, 8), torch.float32, "cuda").requires_grad_(True)
    grad = make_input((4, 128, 8, 8), torch.float32, "cuda", seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        crelu_and_grad(x, 1, grad, cuda_backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = crelu_ext.crelu(x, 1, backend=cuda_backend)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    with torch.no_grad():
        x.copy_(make_input(x.shape, torch.float32, "cuda", seed=2))
    graph.replay()
    torch.cuda.synchronize()
    expected, expected_grad = crelu_and_grad(x, 1, grad, "reference")
    assert_bitwise_equal(out, expected, "forward after replay")
    assert_bitwise_equal(grad_x, expected_grad, "backward after replay")


def test_runs_on_the_current_side_stream(cuda_backend):
    x = make_input((8, 256, 32, 32), torch.float16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # a slow kernel first: a wrong stream would race it
        out = crelu_ext.crelu(x, 1, backend=cuda_backend)
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise_equal(out, crelu_ext.reference.crelu(x, 1))


def test_deterministic_reruns(cuda_backend):
    x = make_input((3, 40, 9, 11), torch.bfloat16, "cuda")
    grad = make_input((3, 80, 9, 11), torch.bfloat16, "cuda", seed=1)
    first = crelu_and_grad(x, 1, grad, cuda_backend)
    second = crelu_and_grad(x, 1, grad, cuda_backend)
    for a, b in zip(first, second, strict=True):
        assert_bitwise_equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device(cuda_backend):
    x = make_input((2, 32, 4, 4), torch.float32, "cuda:1")
    out = crelu_ext.crelu(x, 1, backend=cuda_backend)
    assert out.device == x.device
    assert_bitwise_equal(out, crelu_ext.reference.crelu(x, 1))


@pytest.mark.large
def test_more_than_2_pow_31_elements(cuda_backend):
    # The output has 2 * numel elements: 32-bit offsets would wrap at 2^30 inputs.
    numel = 2**31 + 8 + 3  # odd tail: the scalar path past 2^31 too
    if torch.cuda.get_device_properties(0).total_memory < 4 * numel * 2 * 1.2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(numel, dtype=torch.float16, device="cuda")
    x[: numel // 2].fill_(1.5)
    x[numel // 2 :].fill_(-2.0)
    out = crelu_ext.crelu(x, 0, backend=cuda_backend)
    assert out.numel() == 2 * numel
    head, tail = out[:numel], out[numel:]
    assert bool((head[: numel // 2] == 1.5).all()) and bool((head[numel // 2 :] == 0).all())
    assert bool((tail[: numel // 2] == 0).all()) and bool((tail[numel // 2 :] == 2.0).all())
    del out
    x.requires_grad_(True)
    out = crelu_ext.crelu(x, 0, backend=cuda_backend)
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert bool((grad_x[: numel // 2] == 1).all()) and bool((grad_x[numel // 2 :] == -1).all())


@pytest.mark.parametrize(
    ("shape", "dim"), [((4, 64, 8, 8), 1), ((3, 37), 1), ((2, 5, 16), 2), ((1, 33), 0)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_gpu_gives_the_emulators_bytes(shape, dim, dtype):
    # What CI checks on the host (tests/ops/test_emulated.py) holds on the GPU:
    # the same outputs and mask bytes, padding included. Where there is a GPU there is
    # the CUDA toolkit that builds the emulator: a build without it fails here, not skips.
    if not _emulated.AVAILABLE:
        pytest.fail(f"no emulator to compare the GPU with: {_emulated.UNAVAILABLE_REASON}")
    ops = torch.ops.crelu_ext
    x = make_input(shape, dtype)
    out, mask = ops.crelu(x.cuda(), dim, True)
    emulated_out, emulated_mask = ops.emulated_crelu(x, dim, True)
    assert_bitwise_equal(out, emulated_out, "forward")
    assert torch.equal(mask.cpu(), emulated_mask), "mask bytes differ"
    grad_out = make_input(out.shape, dtype, seed=1)
    fmt = torch.contiguous_format
    assert_bitwise_equal(
        ops.crelu_backward(grad_out.cuda(), mask, dim, fmt),
        ops.emulated_crelu_backward(grad_out, emulated_mask, dim, fmt),
        "backward",
    )
