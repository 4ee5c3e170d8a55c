"""What ``crelu_ext.fuse`` and ``crelu_ext.recompute`` save on models that use
CReLU: the training step time (forward, backward, SGD update) and the bytes
autograd saves for backward, for each variant of a model in the same run.

    python benchmarks/fuse_step.py --out benchmarks/results/fuse/fuse_step_cpu.json

Models, each with its idiom:
- DetectorStem: FaceBoxes' CReLU blocks written by hand (conv -> BN ->
  cat([x, -x], 1) -> relu_, twice, then a conv head);
- MLP: RL code's cat((relu(h), relu(-h)), dim=-1), 3 layers;
- CReLUStem: conv -> BN -> crelu_ext.CReLU -> conv;
- CReLUMLP: 3 x (Linear -> crelu_ext.CReLU(-1)).
Variants: as written, fused (``fuse(model)``; the CReLU models need none) and
fused with ``recompute=True``.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import crelu_ext
from crelu_ext._memory import saved_bytes
from crelu_ext.bench.harness import run_context


class DetectorStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 7, stride=4, padding=3)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(48, 64, 5, stride=2, padding=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Conv2d(128, 32, 3, padding=1)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = F.relu(torch.cat([x, -x], 1), inplace=True)
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.bn2(self.conv2(x))
        x = F.relu(torch.cat([x, -x], 1), inplace=True)
        return self.head(x)


class MLP(nn.Module):
    def __init__(self, width, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(width if i == 0 else 2 * width, width) for i in range(layers)
        )
        self.head = nn.Linear(2 * width, 16)

    def forward(self, x):
        for layer in self.layers:
            h = layer(x)
            x = torch.cat((F.relu(h), F.relu(-h)), dim=-1)
        return self.head(x)


class CReLUStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm2d(32)
        self.act = crelu_ext.CReLU()
        self.head = nn.Conv2d(64, 32, 3, padding=1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def crelu_mlp(width, layers=3):
    blocks = []
    for i in range(layers):
        blocks += [nn.Linear(width if i == 0 else 2 * width, width), crelu_ext.CReLU(-1)]
    return nn.Sequential(*blocks, nn.Linear(2 * width, 16))


def training_step(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


class _CReLUOutputs(TorchDispatchMode):
    """Adds up the bytes of the fused op's outputs: at the dispatcher, which
    every call reaches (eager calls skip torch.ops' Python front)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.crelu_ext.crelu.default:
            self.bytes += out[0].numel() * out[0].element_size()
        return out


def crelu_output_bytes(fused_model, x) -> int:
    with _CReLUOutputs() as outputs:
        fused_model(x)
    return outputs.bytes


def compare(model, x, reps):
    """Times the variants' steps in alternation, so that a change in the
    machine's load hits all alike; median and minimum of ``reps`` each."""
    variants = {
        "as written": model,
        "fused": crelu_ext.fuse(copy.deepcopy(model)),
        "fused, recompute=True": crelu_ext.fuse(copy.deepcopy(model), recompute=True),
    }
    steps = {name: training_step(m, x) for name, m in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    fused = variants["fused"]
    result = {
        "input": list(x.shape),
        "fused_nodes": fused.fused,
        "crelu_output_MiB": crelu_output_bytes(fused, x) / 2**20,
    }
    for name, m in variants.items():
        saved = saved_bytes(lambda m=m: m(x).square().mean(), exclude=list(m.parameters()))
        result[name] = {
            "step_ms_median": statistics.median(times[name]) * 1e3,
            "step_ms_min": min(times[name]) * 1e3,
            "saved_MiB": saved / 2**20,
        }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--mlp-batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024, help="MLP width")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    image = torch.randn(args.batch_size, 3, args.size, args.size)
    features = torch.randn(args.mlp_batch_size, args.width)
    models = {
        "DetectorStem": (DetectorStem(), image),
        "MLP": (MLP(args.width), features),
        "CReLUStem": (CReLUStem(), image),
        "CReLUMLP": (crelu_mlp(args.width), features),
    }
    results = {name: compare(model.train(), x, args.reps) for name, (model, x) in models.items()}
    context = run_context(torch.device("cpu"), [])
    context["command"] = " ".join(["python", "benchmarks/fuse_step.py", *(argv or sys.argv[1:])])
    report = {"context": context, "models": "benchmarks/fuse_step.py", "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
