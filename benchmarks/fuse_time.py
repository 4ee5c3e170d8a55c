"""How long ``crelu_ext.fuse`` takes on a model of about 200 modules: a
Sequential of 65 blocks, each a conv, a BatchNorm and a module whose forward
writes the idiom (196 modules in all).

    python benchmarks/fuse_time.py

Two models: one where the 65 idiom modules share a class (one forward to read
and rewrite), one where each has a class of its own (65 forwards, each read,
checked and compiled once per process). For each: the first fuse in the
process, fusing a new model of the same classes, and fusing the fused model
again (median of ``--repeat``).
"""

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import crelu_ext

BLOCKS = 65


class CReLUBlock(nn.Module):
    def forward(self, x):
        x = torch.cat([x, -x], 1)
        x = F.relu(x, inplace=True)
        return x


def distinct_classes(folder: Path) -> list[type]:
    """BLOCKS classes of their own, written to a module file (fuse reads the
    source of each)."""
    source = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n"
    source += "\n".join(
        f"class Block{i}(nn.Module):\n"
        f"    def forward(self, x):\n"
        f"        return torch.cat([F.relu(x), F.relu(-x)], {1 + i % 2})\n"
        for i in range(BLOCKS)
    )
    (folder / "fuse_time_blocks.py").write_text(source)
    sys.path.insert(0, str(folder))
    module = importlib.import_module("fuse_time_blocks")
    return [getattr(module, f"Block{i}") for i in range(BLOCKS)]


def model(classes: list[type]) -> nn.Sequential:
    layers = []
    for cls in classes:
        layers += [nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), cls()]
    return nn.Sequential(*layers)


def fuse_ms(target: nn.Module) -> float:
    start = time.perf_counter()
    crelu_ext.fuse(target)
    return (time.perf_counter() - start) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        cases = {
            "one class": [CReLUBlock] * BLOCKS,
            f"{BLOCKS} classes": distinct_classes(Path(folder)),
        }
        for name, classes in cases.items():
            first_model = model(classes)
            first = fuse_ms(first_model)
            new = statistics.median(fuse_ms(model(classes)) for _ in range(args.repeat))
            again = statistics.median(fuse_ms(first_model) for _ in range(args.repeat))
            modules = len(list(first_model.modules()))
            print(
                f"{name}: {modules} modules, {len(first_model.fused)} idioms fused; "
                f"first fuse {first:.1f} ms, a new model {new:.1f} ms, "
                f"the fused model again {again:.1f} ms"
            )


if __name__ == "__main__":
    main()
