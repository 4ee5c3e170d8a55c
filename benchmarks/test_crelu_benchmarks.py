"""pytest-benchmark suites: every provider side by side, per case and direction.

    pytest benchmarks/ --benchmark-only                  # on CUDA if there is a GPU
    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare

Not part of the test run (pyproject's testpaths is tests/). The harness
`python -m crelu_ext bench` reports bandwidth and the copy roofline; these
suites track times across commits.
"""

import pytest
import torch

from crelu_ext.bench import harness as bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = bench.providers(DEVICE)
SHAPES = [*bench.TARGET_SHAPES, *bench.sweep([8, 64])]


def synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run(*args):
        result = fn(*args)
        torch.cuda.synchronize()
        return result

    return run


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("direction", bench.DIRECTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.dims}-{s.layout}")
def test_crelu(benchmark, shape, direction, provider):
    torch._dynamo.config.recompile_limit = 1024
    x = torch.randn(shape.dims, device=DEVICE)
    if shape.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(torch.cat([x, x], 1))
    step, setup = bench.steps(PROVIDERS[provider], x, grad)[direction]
    benchmark.group = f"{shape.dims} {shape.layout} {direction}"
    benchmark.extra_info["input_bytes"] = x.numel() * x.element_size()
    step = synchronized(step)
    if setup is None:
        benchmark(step)
    else:
        benchmark.pedantic(step, setup=lambda: ((setup(),), {}), rounds=20, warmup_rounds=3)
