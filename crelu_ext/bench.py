"""``python -m crelu_ext bench``: CReLU against its peers and the copy roofline.

Method (SPEC section 5): effective bandwidth = minimal bytes / median time.
With E input elements: forward (inference, no mask) reads E and writes 2E;
backward reads the 2E gradient and the 2-bit mask and writes E; forward+backward
is both, the forward also writing the mask. The roofline is a same-run
``dst.copy_(src)`` of a tensor the size of the output, counting its read and
write. Every figure of a run comes from that run, on one device.

On CPU the allocator decides much of the result. glibc's malloc maps every
allocation over 32 MB afresh, so each call's output pages fault on first
touch and the OS zeroes them: every provider then runs at the page-fault rate
("system"). Caching allocators (jemalloc, tcmalloc, and the CUDA allocator on
GPUs) reuse memory; "reuse" gets the same from glibc by raising its mmap and
trim thresholds, and shows what the kernels themselves do. The roofline copy
writes into a preallocated tensor in both.
"""

import argparse
import contextlib
import csv
import ctypes
import datetime
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, reference
from .backends import available_backends, crelu

DIRECTIONS = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple[int, ...]
    layout: str = "contiguous"  # or "channels_last"


# The activations CReLU sees in the paper's networks (Table 1 and 5 models).
PAPER_SHAPES = [
    Shape("ConvPool-CNN-C conv1-3, CIFAR, batch 128", (128, 96, 32, 32)),
    Shape("ConvPool-CNN-C conv4-6", (128, 192, 16, 16)),
    Shape("ConvPool-CNN-C conv7-8", (128, 192, 6, 6)),
    Shape("All-CNN-B conv1-2, ImageNet, batch 64", (64, 96, 54, 54)),
    Shape("All-CNN-B conv3", (64, 96, 27, 27)),
    Shape("All-CNN-B conv4", (64, 256, 27, 27)),
]
# The shapes issue 2's CPU targets name.
TARGET_SHAPES = [
    Shape("target, contiguous", (64, 64, 56, 56)),
    Shape("target, channels_last", (128, 96, 32, 32), "channels_last"),
]


def sweep(sides: list[int]) -> list[Shape]:
    """(8, 64, s, s): from latency bound to far above a GPU's L2 (50 MB on H100)."""
    return [Shape(f"sweep {8 * 64 * s * s}", (8, 64, s, s)) for s in sides]


QUICK_SIDES = {"cpu": [8, 32, 64, 128], "cuda": [8, 32, 64, 128, 256, 512]}
FULL_SIDES = {"cpu": [8, 16, 32, 64, 128, 256], "cuda": [8, 16, 32, 64, 128, 256, 512, 768]}


def shapes_for(device: torch.device, full: bool) -> list[Shape]:
    sides = (FULL_SIDES if full else QUICK_SIDES)[device.type]
    shapes = TARGET_SHAPES + sweep(sides)
    if full:
        shapes += PAPER_SHAPES
        shapes += [Shape(s.name, s.dims, "channels_last") for s in PAPER_SHAPES + sweep(sides)]
    return shapes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def timer(device: torch.device, reps: int):
    """``measure(step, setup=None) -> (median seconds, spread seconds)``, after
    warm-up; the spread is half the 20-80 percentile range. With ``setup``,
    each run times ``step(setup())`` without the setup: the backward alone
    needs a fresh forward each time (a compiled backward runs only once)."""
    cuda = device.type == "cuda"

    def measure(step, setup=None):
        if cuda and setup is None:
            from triton.testing import do_bench

            median, low, high = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return median / 1e3, (high - low) / 2e3
        prepare = setup or (lambda: None)
        run = step if setup else (lambda _: step())
        for _ in range(3):  # compiles, and lets the allocator reach its steady state
            run(prepare())
        times = []
        for _ in range(max(reps, 50) if cuda else reps):
            argument = prepare()
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run(argument)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run(argument)
                times.append(time.perf_counter() - t0)
        quantiles = statistics.quantiles(times, n=10)
        return statistics.median(times), (quantiles[7] - quantiles[1]) / 2

    return measure


def use_reusing_allocator() -> bool:
    """Makes glibc's malloc keep and reuse large blocks, as caching allocators
    do (see the module docstring). False where that is not possible."""
    if platform.system() != "Linux":
        return False
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
        )
    return False


def providers(device: torch.device, names: list[str] | None = None) -> dict:
    """name -> function(x, dim) for every provider that runs on ``device``."""
    result = {
        backend: (lambda b: lambda x, dim: crelu(x, dim, backend=b))(backend)
        for backend in available_backends(device)
        if backend != "reference"
    }
    result["eager"] = reference.crelu
    # Static shapes, one graph per case, as CNN training has them. Dynamo keys
    # its cache on the code object, which both share: the limit is raised in main.
    result["compile"] = torch.compile(reference.crelu, dynamic=False)
    # Inductor's other cat lowering: copies into the output, no pointwise fusion.
    result["compile-catcopy"] = torch.compile(
        reference.crelu, dynamic=False, options={"max_pointwise_cat_inputs": 0}
    )
    if names:
        unknown = set(names) - set(result)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; available: {list(result)}")
        result = {name: result[name] for name in names}
    return result


def minimal_bytes(direction: str, numel: int, element_size: int) -> int:
    mask = numel // 4  # 2 bits per element
    forward = 3 * numel * element_size
    backward = 3 * numel * element_size + mask
    return {
        "forward": forward,
        "backward": backward,
        "forward+backward": forward + mask + backward,
    }[direction]


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes,
    leaving out the storages of the tensors in ``exclude`` (parameters, say)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def peak_memory(step, device: torch.device) -> int | None:
    """Peak CUDA memory above what was allocated before one call of step(); None
    off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def steps(fn, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """direction -> (step, setup or None): what measure() times."""
    xg = x.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return fn(x, 1)

    def backward(out):
        return torch.autograd.grad(out, xg, grad)

    def forward_backward():
        return backward(fn(xg, 1))

    return {
        "forward": (forward, None),
        "backward": (backward, lambda: fn(xg, 1)),
        "forward+backward": (forward_backward, None),
    }


def run_shape(shape: Shape, dtype, device, fns: dict, measure, allocator: str) -> list[dict]:
    x = torch.randn(shape.dims, dtype=dtype, device=device)
    if shape.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    numel, size = x.numel(), x.element_size()
    grad = torch.randn_like(torch.cat([x, x], 1))
    src, dst = torch.randn_like(grad), torch.empty_like(grad)
    copy_seconds, _ = measure(lambda: dst.copy_(src))
    copy_bandwidth = 2 * src.numel() * size / copy_seconds
    rows = []
    for name, fn in fns.items():
        kept = saved_bytes(lambda fn=fn: fn(x.detach().requires_grad_(True), 1))
        for direction, (step, setup) in steps(fn, x, grad).items():
            seconds, spread = measure(step, setup)
            bandwidth = minimal_bytes(direction, numel, size) / seconds
            rows.append(
                {
                    "case": shape.name,
                    "shape": "x".join(map(str, shape.dims)),
                    "layout": shape.layout,
                    "dtype": str(dtype).removeprefix("torch."),
                    "input_bytes": numel * size,
                    "direction": direction,
                    "allocator": allocator,
                    "provider": name,
                    "median_ms": seconds * 1e3,
                    "spread_ms": spread * 1e3,
                    "gbps": bandwidth / 1e9,
                    "copy_gbps": copy_bandwidth / 1e9,
                    "fraction_of_copy": bandwidth / copy_bandwidth,
                    "saved_bytes_per_element": kept / numel,
                    "peak_bytes": peak_memory(step, device)
                    if direction == "forward+backward"
                    else None,
                }
            )
    for direction in DIRECTIONS:
        same = [row for row in rows if row["direction"] == direction]
        by_name = {row["provider"]: row["median_ms"] for row in same}
        for row in same:
            for peer in ("eager", "compile", "compile-catcopy"):
                row[f"speedup_vs_{peer}"] = (
                    by_name[peer] / row["median_ms"] if peer in by_name else ""
                )
    return rows


def ratio(value) -> str:
    return f"{value:.2f}x" if value != "" else "-"


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'shape':>16} {'layout':>13} {'dtype':>8} {'direction':>16} {'alloc':>7} "
        f"{'provider':>15} {'ms':>9} {'±ms':>6} {'GB/s':>7} {'copy%':>6} {'saved B/el':>10} "
        f"{'vs eager':>8} {'vs compile':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:>16} {r['layout']:>13} {r['dtype']:>8} {r['direction']:>16} "
            f"{r['allocator']:>7} {r['provider']:>15} {r['median_ms']:9.3f} "
            f"{r['spread_ms']:6.2f} {r['gbps']:7.2f} {100 * r['fraction_of_copy']:5.0f}% "
            f"{r['saved_bytes_per_element']:10.2f} "
            f"{ratio(r['speedup_vs_eager']):>8} {ratio(r['speedup_vs_compile']):>10}"
        )


def run_context(device: torch.device, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "crelu_ext": __version__,
        "command": shlex.join(["python", "-m", "crelu_ext", "bench", *argv]),
    }


def append_results(rows: list[dict], context: dict, path: Path) -> None:
    fields = [*context, *rows[0]]
    if path.exists():
        with path.open(newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != fields:  # the columns changed: start a new file, keep the old
            path.rename(path.with_name(f"{path.stem}.until-{context['date'][:10]}.csv"))
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**context, **row})


def plot_bandwidth(rows: list[dict], context: dict, path: Path) -> bool:
    """GB/s against input size over the sweep, one line per provider and the
    copy roofline, one panel per direction. False when the run had no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_rows = [r for r in rows if r["case"].startswith("sweep") and r["layout"] == "contiguous"]
    if not sweep_rows:
        return False
    dtype, allocator = sweep_rows[0]["dtype"], sweep_rows[-1]["allocator"]
    sweep_rows = [r for r in sweep_rows if r["dtype"] == dtype and r["allocator"] == allocator]
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(15, 4.5), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        these = [r for r in sweep_rows if r["direction"] == direction]
        for provider in dict.fromkeys(r["provider"] for r in these):
            mine = [r for r in these if r["provider"] == provider]
            points = sorted((r["input_bytes"], r["gbps"]) for r in mine)
            ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        roofline = sorted({(r["input_bytes"], r["copy_gbps"]) for r in these})
        ax.plot(*zip(*roofline, strict=True), "k--", label="copy (roofline)")
        ax.set_xscale("log", base=2)
        ax.set_title(direction)
        ax.set_xlabel("input bytes")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("effective GB/s")
    axes[-1].legend(fontsize=8)
    fig.suptitle(
        f"CReLU, {dtype}, (8, 64, s, s) contiguous, {allocator} allocator: {context['device']}, "
        f"torch {context['torch']}, {context['date'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_shape(spec: str) -> Shape:
    dims, _, layout = spec.partition(":")
    return Shape(f"custom {dims}", tuple(int(d) for d in dims.split(",")), layout or "contiguous")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m crelu_ext bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the paper's activation shapes, a longer sweep, NCHW and channels_last, "
        "float32, bfloat16 and float16 (default: a quick run in --dtype)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per CPU measurement")
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="N,C,H,W[:channels_last]",
        help="benchmark this shape instead (repeatable)",
    )
    parser.add_argument(
        "--providers", help="comma-separated subset, e.g. native,eager (default: all)"
    )
    parser.add_argument(
        "--allocator",
        choices=["system", "reuse", "both"],
        default="both",
        help="CPU only: how output memory is obtained (see above); default both",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-save", action="store_true", help="print only; save nothing")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from tqdm import tqdm

    device = torch.device(args.device)
    shapes = args.shape or shapes_for(device, args.full)
    dtype_names = ["float32", "bfloat16", "float16"] if args.full else [args.dtype]
    dtypes = [getattr(torch, name) for name in dtype_names]
    context = run_context(device, argv)
    print(
        f"{context['device']} | torch {context['torch']} | triton {context['triton']} | "
        f"crelu_ext {__version__} | threads {context['threads']} | "
        f"cpu capability {context['cpu_capability']}",
        file=sys.stderr,
    )
    # Every case compiles each torch.compile provider anew (grad mode, shape,
    # layout, dtype): more graphs than Dynamo's default limit of 8 per function.
    torch._dynamo.config.recompile_limit = 1024
    fns = providers(device, args.providers.split(",") if args.providers else None)
    measure = timer(device, args.reps)
    if device.type == "cuda":
        allocators = ["caching"]
    else:
        allocators = ["system", "reuse"] if args.allocator == "both" else [args.allocator]
    rows = []
    total = len(allocators) * len(shapes) * len(dtypes)
    progress = tqdm(total=total, desc="bench", unit="case", file=sys.stderr)
    for allocator in allocators:
        # glibc cannot go back once it reuses memory, so "system" runs first.
        if allocator == "reuse" and not use_reusing_allocator():
            print("cannot make the allocator reuse memory here; skipped", file=sys.stderr)
            progress.update(len(shapes) * len(dtypes))
            continue
        for dtype in dtypes:
            for shape in shapes:
                rows += run_shape(shape, dtype, device, fns, measure, allocator)
                progress.update()
    progress.close()
    print_table(rows)
    if args.no_save:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"bench_{device.type}.csv"
    append_results(rows, context, csv_path)
    print(f"appended to {csv_path}", file=sys.stderr)
    plot_path = args.out / f"bandwidth_{device.type}.png"
    if plot_bandwidth(rows, context, plot_path):
        print(f"plot: {plot_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
