"""``python -m crelu_ext bench``: CReLU against its peers and the copy roofline.

Method (SPEC section 5): effective bandwidth = minimal bytes / median time.
Forward (inference, no mask) reads E and writes 2E elements; forward+backward
also writes and reads the 2-bit mask, reads the 2E gradient and writes E. The
roofline is a same-run ``dst.copy_(src)`` of a tensor the size of the output,
counting its read and write. Every figure comes from one run on one device.

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

# Activations the paper's CReLU layers see, one per layout.
CPU_SHAPES = [((64, 64, 56, 56), "contiguous"), ((128, 96, 32, 32), "channels_last")]
CUDA_SHAPES = [
    ((64, 64, 56, 56), "contiguous"),
    ((128, 96, 32, 32), "channels_last"),
    ((256, 256, 56, 56), "contiguous"),  # 822 MB of fp32 input: far above L2
    ((8, 32, 16, 16), "contiguous"),  # latency bound
]


@dataclass
class Case:
    shape: tuple[int, ...]
    layout: str
    dtype: torch.dtype
    direction: str  # "forward" or "forward+backward"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def timer(device: torch.device, reps: int):
    """Median seconds of fn() over reps runs, after warm-up."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None

        def measure(fn):
            if do_bench is not None:
                return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3, 0.0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(3):
                fn()
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times), statistics.pstdev(times)

        return measure

    def measure(fn):
        for _ in range(3):  # compiles, and lets the allocator reach its steady state
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), statistics.pstdev(times)

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
    result["compile"] = torch.compile(reference.crelu)
    compile_no_pointwise_cat = torch.compile(reference.crelu)

    def compile_cat_copy(x, dim):
        # The other cat lowering: inductor's copy-based cat, no pointwise fusion.
        with torch._inductor.config.patch(max_pointwise_cat_inputs=0):
            return compile_no_pointwise_cat(x, dim)

    result["compile-catcopy"] = compile_cat_copy
    if names:
        unknown = set(names) - set(result)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; available: {list(result)}")
        result = {name: result[name] for name in names}
    return result


def minimal_bytes(case: Case, numel: int, element_size: int) -> int:
    if case.direction == "forward":
        return 3 * numel * element_size
    mask = 2 * (numel * 2 // 8)  # written once, read once: 2 bits per element
    return 6 * numel * element_size + mask


def run_case(case: Case, device: torch.device, fns: dict, measure, allocator: str) -> list[dict]:
    x = torch.randn(case.shape, dtype=case.dtype, device=device)
    if case.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    numel, size = x.numel(), x.element_size()
    out_like = torch.cat([x, x], 1)
    grad = torch.randn_like(out_like)
    src, dst = torch.randn_like(out_like), torch.empty_like(out_like)
    copy_seconds, _ = measure(lambda: dst.copy_(src))
    copy_bandwidth = 2 * src.numel() * size / copy_seconds
    rows = []
    for name, fn in fns.items():
        if case.direction == "forward":

            def step(fn=fn):
                with torch.no_grad():
                    return fn(x, 1)

        else:
            xg = x.detach().requires_grad_(True)

            def step(fn=fn, xg=xg):
                return torch.autograd.grad(fn(xg, 1), xg, grad)

        seconds, spread = measure(step)
        bandwidth = minimal_bytes(case, numel, size) / seconds
        rows.append(
            {
                "shape": "x".join(map(str, case.shape)),
                "layout": case.layout,
                "dtype": str(case.dtype).removeprefix("torch."),
                "direction": case.direction,
                "allocator": allocator,
                "provider": name,
                "median_ms": seconds * 1e3,
                "spread_ms": spread * 1e3,
                "gbps": bandwidth / 1e9,
                "copy_gbps": copy_bandwidth / 1e9,
                "fraction_of_copy": bandwidth / copy_bandwidth,
            }
        )
    by_name = {row["provider"]: row["median_ms"] for row in rows}
    for row in rows:
        for peer in ("eager", "compile"):
            row[f"speedup_vs_{peer}"] = by_name[peer] / row["median_ms"] if peer in by_name else ""
    return rows


def ratio(value) -> str:
    return f"{value:.2f}x" if value != "" else "-"


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'shape':>16} {'layout':>13} {'dtype':>8} {'direction':>16} {'allocator':>9} "
        f"{'provider':>15} {'ms':>9} {'±ms':>6} {'GB/s':>7} {'copy%':>6} {'vs eager':>8} "
        f"{'vs compile':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:>16} {r['layout']:>13} {r['dtype']:>8} {r['direction']:>16} "
            f"{r['allocator']:>9} {r['provider']:>15} {r['median_ms']:9.3f} "
            f"{r['spread_ms']:6.2f} {r['gbps']:7.2f} {100 * r['fraction_of_copy']:5.0f}% "
            f"{ratio(r['speedup_vs_eager']):>8} {ratio(r['speedup_vs_compile']):>10}"
        )


def append_results(rows: list[dict], device: torch.device, out_dir: Path) -> Path:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "crelu_ext": __version__,
        "command": shlex.join(["python", "-m", "crelu_ext", *sys.argv[1:]]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{device.type}.csv"
    fields = [*context, *rows[0]]
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**context, **row})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crelu_ext bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per CPU measurement")
    parser.add_argument(
        "--shape",
        action="append",
        metavar="N,C,H,W[:channels_last]",
        help="benchmark this shape instead of the defaults (repeatable)",
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
    parser.add_argument("--no-save", action="store_true", help="print only; append no results")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.shape:
        shapes = []
        for spec in args.shape:
            dims, _, layout = spec.partition(":")
            shapes.append((tuple(int(d) for d in dims.split(",")), layout or "contiguous"))
    else:
        shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    cases = [
        Case(shape, layout, dtype, direction)
        for shape, layout in shapes
        for direction in ("forward", "forward+backward")
    ]
    print(
        f"device: {device_name(device)} | torch {torch.__version__} | crelu_ext {__version__}"
        f" | threads {torch.get_num_threads()} | cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        file=sys.stderr,
    )
    fns = providers(device, args.providers.split(",") if args.providers else None)
    measure = timer(device, args.reps)
    if device.type == "cuda":
        allocators = ["caching"]
    else:
        allocators = ["system", "reuse"] if args.allocator == "both" else [args.allocator]
    rows = []
    progress = tqdm(total=len(cases) * len(allocators), desc="bench", unit="case", file=sys.stderr)
    for allocator in allocators:
        # glibc cannot go back once it reuses memory, so "system" runs first.
        if allocator == "reuse" and not use_reusing_allocator():
            print("cannot make the allocator reuse memory here; skipped", file=sys.stderr)
            continue
        for case in cases:
            rows += run_case(case, device, fns, measure, allocator)
            progress.update()
    progress.close()
    print_table(rows)
    if not args.no_save:
        print(f"appended to {append_results(rows, device, args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
