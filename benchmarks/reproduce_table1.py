"""A small reproduction of the paper's Table 1 on the built-in digits.

Trains ReLU, CReLU, CReLU at half width and AVR ConvPool-CNN-C over several seeds with
``python -m crelu_ext train`` and writes a markdown table of test error (mean ± std
over seeds) and parameter counts. The paper's figures are for CIFAR at full width and
hundreds of epochs; this is what fits a 2-core CPU.

    python benchmarks/reproduce_table1.py --width 0.25 --epochs 30 --seeds 0 1 2
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from crelu_ext import train

# (name, activation, width multiplier) as in Table 1.
VARIANTS = [
    ("ReLU", "relu", 1.0),
    ("CReLU", "crelu", 1.0),
    ("CReLU (half)", "crelu", 0.5),
    ("AVR", "avr", 1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=float, default=0.25, help="width of the ReLU baseline")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/training/table1_digits.md")
    )
    args = parser.parse_args()

    lines = [
        f"| model | parameters | test error (mean ± std over {len(args.seeds)} seeds) |",
        "|---|---|---|",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, activation, width in VARIANTS:
            errors, parameters = [], 0
            for seed in args.seeds:
                metrics_path = Path(tmp) / f"{activation}-{width}-{seed}.json"
                train.main(
                    ["--activation", activation, "--width", str(args.width * width),
                     "--epochs", str(args.epochs), "--lr", str(args.lr),
                     "--batch-size", str(args.batch_size), "--seed", str(seed),
                     "--metrics-out", str(metrics_path)]
                )  # fmt: skip
                metrics = json.loads(metrics_path.read_text())
                errors.append(100 * (1 - metrics["test_accuracy"]))
                parameters = metrics["num_parameters"]
            results[name] = {"errors": errors, "parameters": parameters}
            spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
            lines.append(
                f"| {name} | {parameters:,} | {statistics.mean(errors):.2f} ± {spread:.2f} % |"
            )
    header = (
        f"ConvPool-CNN-C on scikit-learn's digits (32x32), ReLU width {args.width}, "
        f"{args.epochs} epochs, SGD momentum 0.9, lr {args.lr}, batch {args.batch_size}, "
        f"seeds {args.seeds}. Command: `python benchmarks/reproduce_table1.py --width "
        f"{args.width} --epochs {args.epochs} --lr {args.lr} --seeds "
        f"{' '.join(map(str, args.seeds))}`\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
