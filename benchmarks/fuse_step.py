"""What ``crelu_ext.fuse`` saves on a model that writes CReLU by hand: the
training step time (forward, backward, SGD update) and the bytes autograd
saves for backward, before and after fusing, in the same run.

    python benchmarks/fuse_step.py --out benchmarks/results/fuse/fuse_step_cpu.json

Two models, each with its idiom: a detector stem in the style of FaceBoxes'
CReLU blocks (conv -> BN -> cat([x, -x], 1) -> relu_, twice, then a conv head)
and an MLP as RL code writes it (cat((relu(h), relu(-h)), dim=-1), 3 layers).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
    def __init__(self, width=1024, layers=3):
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


def training_step(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def compare(model, x, reps):
    """Times the two models' steps in alternation, so that a change in the
    machine's load hits both alike; median and minimum of ``reps`` each."""
    models = {"hand-written": model, "fused": crelu_ext.fuse(model)}
    steps = {name: training_step(m, x) for name, m in models.items()}
    times = {name: [] for name in models}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    result = {"input": list(x.shape), "fused_nodes": models["fused"].fused}
    for name, m in models.items():
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
    parser.add_argument("--size", type=int, default=256, help="detector input height and width")
    parser.add_argument("--mlp-batch-size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    results = {
        "DetectorStem": compare(
            DetectorStem().train(), torch.randn(args.batch_size, 3, args.size, args.size), args.reps
        ),
        "MLP": compare(MLP().train(), torch.randn(args.mlp_batch_size, 1024), args.reps),
    }
    context = run_context(torch.device("cpu"), [])
    context["command"] = " ".join(["python", "benchmarks/fuse_step.py", *(argv or sys.argv[1:])])
    report = {"context": context, "models": "benchmarks/fuse_step.py", "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
