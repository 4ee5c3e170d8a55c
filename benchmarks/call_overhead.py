"""Where a small CReLU call's time goes, layer by layer, against one torch op.

At 1024 elements the kernels take a fraction of a microsecond and the call
decides. This times, interleaved round by round in one process, each layer a
user can call: ``torch.relu(x)`` and ``nn.ReLU()(x)`` (one torch op, plain and
as a module), the four-kernel composition, the registered op through
``torch.ops``, the pybind11 binding ``crelu_ext._C.crelu``, the public
``crelu_ext.crelu`` and the module ``crelu_ext.CReLU``. Calls run back to back
with grad off (``forward``) or on (``forward, grad on``: the autograd node and
mask, no backward). Layers a build lacks are left out, so the same script
times older builds.

    python benchmarks/call_overhead.py [--rounds 15] [--calls 2000]
"""

import argparse
import statistics
import timeit

import torch

import crelu_ext

CASES = {"mlp": ((4, 256), -1), "nchw": ((1, 16, 8, 8), 1)}


def layers(x: torch.Tensor, dim: int) -> dict:
    relu_module = torch.nn.ReLU()
    crelu_module = crelu_ext.CReLU(dim)
    calls = {
        "torch.relu": lambda: torch.relu(x),
        "nn.ReLU()": lambda: relu_module(x),
        "composition": lambda: torch.cat([torch.relu(x), torch.relu(-x)], dim),
        "op.default": lambda: torch.ops.crelu_ext.crelu.default(x, dim, False),
    }
    fast_path = getattr(getattr(crelu_ext, "_C", None), "crelu", None)
    if fast_path is not None:
        calls["_C.crelu"] = lambda: fast_path(x, dim)
    calls["crelu_ext.crelu"] = lambda: crelu_ext.crelu(x, dim)
    calls["CReLU()"] = lambda: crelu_module(x)
    return calls


def interleaved(calls: dict, rounds: int, number: int) -> dict:
    """name -> median seconds per call over rounds, each round in a rotated order."""
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(timeit.timeit(calls[name], number=number) / number)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, 1024 elements")
    print("| case | mode | call | us | in torch.relu calls | in nn.ReLU() calls |")
    print("|---|---|---|---|---|---|")
    for case, (shape, dim) in CASES.items():
        x = torch.randn(shape)
        for mode, grad in (("forward", False), ("forward, grad on", True)):
            with torch.set_grad_enabled(grad):
                source = x.detach().requires_grad_(grad)
                medians = interleaved(layers(source, dim), args.rounds, args.calls)
            relu, module = medians["torch.relu"], medians["nn.ReLU()"]
            for name, seconds in medians.items():
                print(
                    f"| {case} {'x'.join(map(str, shape))} | {mode} | {name} | {seconds * 1e6:.2f} "
                    f"| {seconds / relu:.2f} | {seconds / module:.2f} |"
                )


if __name__ == "__main__":
    main()
