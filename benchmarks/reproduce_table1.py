"""A small reproduction of the paper's Table 1 on the built-in digits.

Trains ReLU, CReLU, CReLU at half width and AVR ConvPool-CNN-C over several seeds with
``python -m crelu_ext train`` and its default recipe (learning rate per activation, warm-up,
cosine decay, gradient clipping), and writes a markdown table of test error: mean, standard
deviation and every seed, with the parameter counts, and whether the paper's ordering
holds. The paper's figures are for CIFAR at full width and hundreds of epochs; this is
what fits a shared 2-core CPU.

    python benchmarks/reproduce_table1.py --width 0.125 --epochs 10 --seeds 0 1 2 3 4 --jobs 2
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (name, activation, width multiplier of the ReLU baseline) as in Table 1.
VARIANTS = [
    ("ReLU", "relu", 1.0),
    ("CReLU", "crelu", 1.0),
    ("CReLU (half)", "crelu", 0.5),
    ("AVR", "avr", 1.0),
]
# Table 1, CIFAR-10, "Average" test error over the 10 folds (%): the ordering to compare.
PAPER_CIFAR10_AVERAGE = {"ReLU": 10.20, "CReLU": 9.39, "CReLU (half)": 9.44, "AVR": 10.26}


def train_command(args: argparse.Namespace, activation: str, width: float, seed: int, out: Path):
    command = [sys.executable, "-m", "crelu_ext", "train", "--activation", activation]
    command += ["--width", str(args.width * width), "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size), "--seed", str(seed)]
    command += ["--metrics-out", str(out / f"{activation}-{width}-{seed}.json")]
    if args.checkpoint_dir is not None:
        name = f"{activation}{'_half' if width != 1 else ''}_seed{seed}.pt"
        command += ["--checkpoint", str(args.checkpoint_dir / name)]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.125, help="width of the ReLU baseline")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--checkpoint-dir", type=Path, help="keep each run's checkpoint here")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/training/table1_digits.md")
    )
    args = parser.parse_args()

    runs = [(variant, seed) for variant in VARIANTS for seed in args.seeds]
    # One thread per training, so that --jobs trainings share the cores evenly.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        commands = [train_command(args, v[1], v[2], seed, Path(tmp)) for v, seed in runs]
        done = pool.map(
            lambda c: subprocess.run(c, env=env, stdout=subprocess.PIPE, text=True), commands
        )
        # A run that fails (a diverged one exits 1) is reported, not averaged.
        metrics = [
            json.loads(Path(c[c.index("--metrics-out") + 1]).read_text())
            if result.returncode == 0
            else {"failed": f"exit {result.returncode}: {shlex.join(c)}"}
            for c, result in zip(commands, done, strict=True)
        ]

    results = {}
    for ((name, _, _), seed), run in zip(runs, metrics, strict=True):
        entry = results.setdefault(name, {"errors": {}, "failed": {}})
        if "failed" in run:
            entry["failed"][seed] = run["failed"]
            continue
        entry["parameters"] = run["num_parameters"]
        entry["errors"][seed] = 100 * (1 - run["test_accuracy"])
    lines = [
        f"| model | parameters | test error, mean ± std over {len(args.seeds)} seeds "
        "| every seed | paper, CIFAR-10 (average) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        errors = list(entry["errors"].values())
        entry["mean"] = statistics.mean(errors) if errors else float("nan")
        entry["std"] = statistics.stdev(errors) if len(errors) > 1 else 0.0
        every = ", ".join(f"{e:.1f}" for e in errors)
        every += "".join(f", seed {seed} failed" for seed in entry["failed"])
        lines.append(
            f"| {name} | {entry.get('parameters', 0):,} | {entry['mean']:.2f} ± "
            f"{entry['std']:.2f} % | {every} | {PAPER_CIFAR10_AVERAGE[name]:.2f} % |"
        )
    ours = sorted(results, key=lambda name: results[name]["mean"])
    paper = sorted(PAPER_CIFAR10_AVERAGE, key=PAPER_CIFAR10_AVERAGE.get)
    verdict = "holds" if ours == paper else "does not hold"
    command = shlex.join(["python", "benchmarks/reproduce_table1.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"ConvPool-CNN-C on scikit-learn's digits (32x32), ReLU width {args.width}, "
            f"{args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}, the default "
            f"recipe of `python -m crelu_ext train`. Command: `{command}`",
            "",
            *lines,
            "",
            f"Ordering by mean error, best first: ours {' < '.join(ours)}; the paper's "
            f"{' < '.join(paper)}. The paper's ordering {verdict} at this scale.",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
