"""``python -m crelu_ext bench``: CReLU against its peers and a same-run copy.

Method: effective bandwidth = minimal bytes / median time.
With E input elements: forward (inference, no mask) reads E and writes 2E;
backward reads the 2E gradient and the 2-bit mask and writes E; forward+backward
is both, the forward also writing the mask. The copy reference is a same-run
``dst.copy_(src)`` of a tensor the size of the output, counting its read and
write. It is no roofline: a copy's stores first read each destination line
(read for ownership), which the fused kernels' non-temporal stores skip, so
they can beat it. Every figure of a run comes from that run, on one device.
The fraction of the copy's bandwidth is printed only where the copy takes at
least 10 times as long as a same-run copy of one element: closer to that, the
call's fixed cost decides both times, not memory (the CSV keeps every fraction).

``--sizes small`` times instead the per-call cost at 2^10 to 2^20 elements,
where launch and framework overhead decide: an MLP activation (B, 256) with
dim=-1 and an NCHW one (B, 16, 8, 8) with dim=1, forward and forward+backward,
interleaving the providers round by round.

Noise (crelu_ext/bench/noise.py): every row keeps its median and its 20th and
80th percentiles. A row is noisy when that band is wider than 0.25 of its
median; it is measured again (--retries) and the narrowest attempt kept. A ratio
(vs eager, vs compile, x relu) holds only where both rows are steady, their
bands do not overlap and the machine was not busy: other processes' runnable
threads, sampled after every measurement (Linux; else the 1-minute load
average), more than half a core over the cores the benchmark's threads leave
free. A fraction of the copy holds where the row and the copy are steady and
the machine was not busy. What does not hold is printed with a ~ prefix; the
last lines say whether the run's figures hold, and if not why (the load, the
noisy rows). The CSV keeps the quantiles, the judgements (noisy, *_holds), the
load averages at the start and end, the sampled load and the thread count; the
plots shade the bands.

On CPU the allocator decides much of the result. glibc's malloc maps every
allocation over 32 MB afresh, so each call's output pages fault on first
touch and the OS zeroes them: every provider then runs at the page-fault rate
("system"). Caching allocators (jemalloc, tcmalloc, and the CUDA allocator on
GPUs) reuse memory; "reuse" gets the same from glibc by raising its mmap and
trim thresholds, and shows what the kernels themselves do. The same-run copy
writes into a preallocated tensor in both.
"""

import argparse
import contextlib
import csv
import ctypes
import datetime
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, reference
from .._memory import peak_memory, saved_bytes
from ..functional import available_backends, crelu
from .noise import (
    JUDGEMENTS,
    NOISY_SPREAD,
    LoadMonitor,
    Timing,
    Verdict,
    judge_ratio,
    mark,
    ratio_band,
    summarize,
    verdict,
)

DIRECTIONS = ("forward", "backward", "forward+backward")
# A copy shorter than this many one-element copies is mostly the call's fixed
# cost (a few microseconds on CPU, a launch on CUDA), and a fraction of it says
# nothing about memory: at the tiniest shapes it comes out above 10.
COPY_MIN_FIXED_COSTS = 10
# Untracked (.gitignore): a plain run leaves the checkout clean.
DEFAULT_OUT = "bench-results"
# No ETA: a case's time depends on its size and on how long torch.compile takes
# to compile its providers, so a rate taken from the first cases misleads.
PROGRESS_FORMAT = "{desc} {n_fmt}/{total_fmt} cases, {elapsed} elapsed{postfix}"


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
# The README's two headline shapes: an NCHW activation and a channels_last one.
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


# The clock of every CPU measurement; the tests replace it to inject noise.
clock = time.perf_counter


def timer(device: torch.device, reps: int):
    """``measure(step, setup=None) -> Timing`` (median, 20th and 80th percentile
    seconds), after warm-up. With ``setup``, each run times ``step(setup())``
    without the setup: the backward alone needs a fresh forward each time (a
    compiled backward runs only once)."""
    cuda = device.type == "cuda"

    def measure(step, setup=None) -> Timing:
        if cuda and setup is None:
            from triton.testing import do_bench

            median, low, high = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return Timing(median / 1e3, low / 1e3, high / 1e3)
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
                t0 = clock()
                run(argument)
                times.append(clock() - t0)
        return summarize(times)

    return measure


def steadiest(take, badness, retries: int):
    """(measurement, attempts): ``take()`` once, and again, up to ``retries`` more
    times, while the best so far is noisy; the attempt of least ``badness`` kept
    (a tuple whose first item is nonzero for a noisy one): a passing disturbance
    widens the bands of the attempt it hits."""
    best, attempts = take(), 1
    while badness(best)[0] and attempts <= retries:
        again = take()
        attempts += 1
        if badness(again) < badness(best):
            best = again
    return best, attempts


def measure_steadily(measure, step, setup=None, retries: int = 0) -> tuple[Timing, int]:
    """(timing, attempts) of ``measure(step, setup)``, the narrowest band kept."""
    return steadiest(lambda: measure(step, setup), lambda t: (t.noisy, t.relative_spread), retries)


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
    # One torch op, the yardstick of per-call cost at small sizes: not a CReLU.
    result["relu"] = lambda x, dim: torch.relu(x)
    # Static shapes, one graph per case, as CNN training has them. Dynamo keys
    # its cache on the code object, which both share: the limit is raised in main.
    result["compile"] = torch.compile(reference.crelu, dynamic=False)
    # Inductor's other cat lowering: copies into the output, no pointwise fusion.
    result["compile-catcopy"] = torch.compile(
        reference.crelu, dynamic=False, options={"max_pointwise_cat_inputs": 0}
    )
    if not names:  # the CReLU providers; relu is asked for by name (the small sweep)
        return {name: fn for name, fn in result.items() if name != "relu"}
    unknown = set(names) - set(result)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; available: {list(result)}")
    return {name: result[name] for name in names}


def minimal_bytes(direction: str, numel: int, element_size: int) -> int:
    mask = numel // 4  # 2 bits per element
    forward = 3 * numel * element_size
    backward = 3 * numel * element_size + mask
    return {
        "forward": forward,
        "backward": backward,
        "forward+backward": forward + mask + backward,
    }[direction]


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The providers every row's speed-up is taken against (speedup_vs_<peer>), and
# the columns that make a case: its rows are compared with one another.
PEERS = ("eager", "compile", "compile-catcopy")
LARGE_RATIOS = {f"speedup_vs_{peer}": (peer, True) for peer in PEERS}
LARGE_GROUP = ("case", "shape", "layout", "dtype", "allocator", "direction")


def timing_columns(timing: Timing, attempts: int, unit: str, scale: float) -> dict:
    """A row's quantiles and noise: beside its median (``median_<unit>``)."""
    return {
        f"p20_{unit}": timing.low * scale,
        f"p80_{unit}": timing.high * scale,
        "relative_spread": timing.relative_spread,
        "noisy": timing.noisy,
        "attempts": attempts,
    }


def run_shape(
    shape: Shape,
    dtype,
    device,
    fns: dict,
    measure,
    allocator: str,
    retries: int = 0,
    load: LoadMonitor | None = None,
) -> list[dict]:
    """Every provider and direction at ``shape``; ``load`` is sampled after
    every measurement."""
    sample = load.sample if load else lambda: None
    x = torch.randn(shape.dims, dtype=dtype, device=device)
    if shape.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    numel, size = x.numel(), x.element_size()
    grad = torch.randn_like(torch.cat([x, x], 1))
    src, dst = torch.randn_like(grad), torch.empty_like(grad)
    copy, _ = measure_steadily(measure, lambda: dst.copy_(src), retries=retries)
    sample()
    copy_bandwidth = 2 * src.numel() * size / copy.median
    rows = []
    for name, fn in fns.items():
        kept = saved_bytes(lambda fn=fn: fn(x.detach().requires_grad_(True), 1))
        for direction, (step, setup) in steps(fn, x, grad).items():
            timing, attempts = measure_steadily(measure, step, setup, retries)
            sample()
            bandwidth = minimal_bytes(direction, numel, size) / timing.median
            rows.append(
                {
                    "case": shape.name,
                    "shape": "x".join(map(str, shape.dims)),
                    "layout": shape.layout,
                    "dtype": dtype_name(dtype),
                    "input_bytes": numel * size,
                    "direction": direction,
                    "allocator": allocator,
                    "provider": name,
                    "median_ms": timing.median * 1e3,
                    "spread_ms": timing.spread * 1e3,
                    "gbps": bandwidth / 1e9,
                    "copy_gbps": copy_bandwidth / 1e9,
                    "fraction_of_copy": bandwidth / copy_bandwidth,
                    "saved_bytes_per_element": kept / numel,
                    "peak_bytes": peak_memory(step, device)
                    if direction == "forward+backward"
                    else None,
                    **timing_columns(timing, attempts, "ms", 1e3),
                    "copy_median_ms": copy.median * 1e3,
                    "copy_p20_ms": copy.low * 1e3,
                    "copy_p80_ms": copy.high * 1e3,
                    "copy_noisy": copy.noisy,
                }
            )
    for direction in DIRECTIONS:
        same = [row for row in rows if row["direction"] == direction]
        by_name = {row["provider"]: row["median_ms"] for row in same}
        for row in same:
            for peer in PEERS:
                row[f"speedup_vs_{peer}"] = (
                    by_name[peer] / row["median_ms"] if peer in by_name else ""
                )
    return rows


def row_timing(row: dict, unit: str) -> Timing:
    """A row's Timing (in the row's unit) from its CSV columns."""
    median = "us_per_call" if unit == "us" else f"median_{unit}"
    return Timing(row[median], row[f"p20_{unit}"], row[f"p80_{unit}"])


def judge_ratios(rows: list[dict], group: tuple, unit: str, ratios: dict, busy: bool) -> dict:
    """Adds ``<column>_holds`` beside each ratio column: True where the ratio
    holds (noise.judge_ratio), False where it does not, "" for a provider against
    itself or a missing peer. ``ratios``: column -> (peer, whether the column is
    the peer's time over the row's); ``group``: the columns rows compare within.
    Returns how many ratios got each judgement."""
    counts = dict.fromkeys(JUDGEMENTS, 0)
    cases: dict = {}
    for row in rows:
        cases.setdefault(tuple(row[key] for key in group), {})[row["provider"]] = row
    for same in cases.values():
        for row in same.values():
            for column, (peer, peer_over_row) in ratios.items():
                if peer not in same or peer == row["provider"]:
                    row[f"{column}_holds"] = ""
                    continue
                mine, theirs = row_timing(row, unit), row_timing(same[peer], unit)
                numerator, denominator = (theirs, mine) if peer_over_row else (mine, theirs)
                judgement = judge_ratio(numerator, denominator, busy)
                counts[judgement] += 1
                row[f"{column}_holds"] = judgement == "holds"
    return counts


def judge_copy(rows: list[dict], busy: bool) -> None:
    """Adds ``fraction_of_copy_holds``: neither the row nor its same-run copy
    noisy, and the machine not busy."""
    for row in rows:
        row["fraction_of_copy_holds"] = not (busy or row["noisy"] or row["copy_noisy"])


def ratio(value) -> str:
    return f"{value:.2f}x" if value != "" else "-"


def judged_ratio(row: dict, column: str) -> str:
    """The ratio as printed: ``~`` before one that does not hold."""
    return mark(ratio(row[column]), row.get(f"{column}_holds", "") is not False)


def fixed_copy_seconds(device: torch.device, measure) -> float:
    """The median time of copying one element: what a copy costs besides memory."""
    src = torch.zeros(1, device=device)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src)).median


def copy_fraction(row: dict, min_copy_seconds: float) -> str:
    """The row's fraction of the copy's bandwidth, or "—" where the copy took
    less than ``min_copy_seconds``, too short to time memory."""
    # The copy moves the output twice (read + write): 2 x 2 x the input's bytes.
    copy_seconds = 4 * row["input_bytes"] / (row["copy_gbps"] * 1e9)
    return f"{row['fraction_of_copy']:.2f}" if copy_seconds >= min_copy_seconds else "—"


def spread_cell(row: dict) -> str:
    """The row's 20-80 percentile band over its median, "noisy" beside a wide one."""
    return f"{row['relative_spread']:.2f}" + (" noisy" if row["noisy"] else "")


def judged_fraction(row: dict, min_copy_seconds: float) -> str:
    fraction = copy_fraction(row, min_copy_seconds)
    return mark(fraction, fraction == "—" or row.get("fraction_of_copy_holds", True))


def print_table(rows: list[dict], min_copy_seconds: float) -> None:
    """One table per direction, dtype and allocator, each with its header."""
    print(
        "GB/s: minimal bytes / median time. vs X: X's median time / this one's.\n"
        f"/copy: GB/s over a same-run copy's, where the copy took {min_copy_seconds * 1e6:.0f} us "
        f"or more ({COPY_MIN_FIXED_COSTS}x a one-element copy; else —, as fixed costs decide).\n"
        "spread: the 20-80 percentile band over the median; noisy above "
        f"{NOISY_SPREAD:.2f}. ~: a figure that does not hold (a noisy row or copy, a busy "
        "machine, or a ratio within the two rows' bands)."
    )
    header = (
        f"{'shape':>16} {'layout':>13} {'provider':>15} {'ms':>9} {'±ms':>7} "
        f"{'spread':>11} {'GB/s':>7} {'/copy':>6} {'saved B/el':>10} {'vs eager':>8} "
        f"{'vs compile':>10}"
    )
    groups = dict.fromkeys((r["dtype"], r["allocator"]) for r in rows)
    for direction in DIRECTIONS:
        for dtype, allocator in groups:
            mine = [
                r
                for r in rows
                if (r["direction"], r["dtype"], r["allocator"]) == (direction, dtype, allocator)
            ]
            if not mine:
                continue
            print(f"\n{direction}, {dtype}, {allocator} allocator")
            print(header)
            print("-" * len(header))
            previous = None
            for r in mine:
                case = (r["shape"], r["layout"])
                shape, layout = case if case != previous else ("", "")
                previous = case
                print(
                    f"{shape:>16} {layout:>13} {r['provider']:>15} {r['median_ms']:9.3f} "
                    f"{r['spread_ms']:7.3f} {spread_cell(r):>11} {r['gbps']:7.2f} "
                    f"{judged_fraction(r, min_copy_seconds):>6} "
                    f"{r['saved_bytes_per_element']:10.2f} "
                    f"{judged_ratio(r, 'speedup_vs_eager'):>8} "
                    f"{judged_ratio(r, 'speedup_vs_compile'):>10}"
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


# Line styles that keep overlapping series apart (compile and compile-catcopy
# often coincide).
PROVIDER_STYLES = {
    "native": {"marker": "o", "linestyle": "-", "linewidth": 2.2},
    "triton": {"marker": "s", "linestyle": "-"},
    "eager": {"marker": "^", "linestyle": "--"},
    "compile": {"marker": "D", "linestyle": "-.", "markersize": 8, "fillstyle": "none"},
    "compile-catcopy": {"marker": "x", "linestyle": ":", "markersize": 7},
}


def plot_series(ax, rows: list[dict], x, y, band, style: dict, label: str) -> None:
    """One provider's line over ``rows`` (sorted by ``x(row)``), its 20-80
    percentile band shaded where ``band(row)`` gives one, and red rings on
    its noisy points."""
    rows = sorted(rows, key=x)
    xs = [x(r) for r in rows]
    (line,) = ax.plot(xs, [y(r) for r in rows], label=label, **style)
    bands = [band(r) for r in rows]
    if all(b is not None for b in bands):
        low, high = zip(*bands, strict=True)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        labels = ax.get_legend_handles_labels()[1]
        ax.scatter([x(r) for r in noisy], [y(r) for r in noisy], s=150, facecolors="none",
                   edgecolors="red", linewidths=1.4, zorder=5,
                   label=None if NOISY_LABEL in labels else NOISY_LABEL)  # fmt: skip


NOISY_LABEL = f"noisy (20-80 percentile band > {NOISY_SPREAD:.2f} of the median)"


def bandwidth_band(row: dict, prefix: str = "") -> tuple[float, float] | None:
    """GB/s at the row's 80th and 20th percentile times, where it has them."""
    if f"{prefix}p20_ms" not in row:
        return None
    gbps = row[f"{prefix}gbps"]
    median = row[f"{prefix}median_ms"]
    return gbps * median / row[f"{prefix}p80_ms"], gbps * median / row[f"{prefix}p20_ms"]


def warn_on_plot(fig, warning: str | None) -> None:
    if warning:
        fig.text(0.5, 0.955, warning, color="red", ha="center", va="top", fontsize=10,
                 fontweight="bold")  # fmt: skip


def plot_bandwidth(rows: list[dict], context: dict, path: Path, warning: str | None = None) -> bool:
    """GB/s against input size over the sweep, one line per provider and the
    same-run copy, one panel per direction, with the 20-80 percentile bands
    shaded and noisy points ringed; ``warning`` in red under the title. False
    when the run had no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_rows = [r for r in rows if r["case"].startswith("sweep") and r["layout"] == "contiguous"]
    if not sweep_rows:
        return False
    dtype, allocator = sweep_rows[0]["dtype"], sweep_rows[-1]["allocator"]
    sweep_rows = [r for r in sweep_rows if r["dtype"] == dtype and r["allocator"] == allocator]
    sides = sorted({int(r["shape"].split("x")[-1]) for r in sweep_rows})
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(15, 5.6), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        these = [r for r in sweep_rows if r["direction"] == direction]
        for provider in dict.fromkeys(r["provider"] for r in these):
            plot_series(
                ax,
                [r for r in these if r["provider"] == provider],
                x=lambda r: r["input_bytes"],
                y=lambda r: r["gbps"],
                band=bandwidth_band,
                style=PROVIDER_STYLES.get(provider, {"marker": "o"}),
                label=provider,
            )
        # One copy per size; as a row of its own, its noise flagged like a provider's.
        copies = {r["input_bytes"]: {**r, "noisy": r.get("copy_noisy", False)} for r in these}
        plot_series(
            ax,
            list(copies.values()),
            x=lambda r: r["input_bytes"],
            y=lambda r: r["copy_gbps"],
            band=lambda r: bandwidth_band(r, "copy_"),
            style={"color": "black", "linestyle": (0, (6, 3)), "linewidth": 1.5},
            label="same-run copy (read + write)",
        )
        ax.set_xscale("log", base=2)
        ax.set_title(direction)
        ax.set_xlabel(f"input x, bytes (x = (8, 64, s, s), s = {sides[0]} ... {sides[-1]})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("effective bandwidth, GB/s\n(minimal bytes / median time)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(
        f"CReLU, {dtype}, contiguous, {allocator} allocator: {context['device']}, "
        f"torch {context['torch']}, {context['date'][:10]}"
    )
    fig.text(
        0.01,
        0.01,
        "Lines: medians; shaded: the 20-80 percentile band of each point's runs. "
        "Minimal bytes for E input elements: forward reads E and writes 2E elements; backward "
        "reads the 2E gradient and the 2-bit mask and writes E; forward+backward is both.\n"
        "Same-run copy: dst.copy_(src) of an output-sized tensor in the same run, counting its "
        "read and write. It is not a roofline: a copy's ordinary stores first read each\n"
        "destination cache line (read for ownership), while the fused kernels write large "
        "outputs with non-temporal stores that skip that read, so they can beat the copy.",
        fontsize=8.5,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.94 if warning else 1))
    warn_on_plot(fig, warning)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_summary(rows: list[dict], min_copy_seconds: float) -> None:
    """Per shape: native's speed-ups over eager and torch.compile, and its
    fraction of the same-run copy's bandwidth; ``~`` where a figure does not hold."""
    native = [r for r in rows if r["provider"] == "native"]
    if not native:
        return
    print(
        "\nsummary, native (speed-up = other's time / native's; copy = native GB/s / copy GB/s, "
        "where the copy is long enough to tell; ~: does not hold, see the closing lines):"
    )
    cases = dict.fromkeys((r["shape"], r["layout"], r["dtype"], r["allocator"]) for r in native)
    for shape, layout, dtype, allocator in cases:
        parts = []
        for r in native:
            if (r["shape"], r["layout"], r["dtype"], r["allocator"]) == (shape, layout, dtype,
                                                                        allocator):  # fmt: skip
                fraction = judged_fraction(r, min_copy_seconds)
                parts.append(
                    f"{r['direction']} {judged_ratio(r, 'speedup_vs_eager')} eager, "
                    f"{judged_ratio(r, 'speedup_vs_compile')} compile"
                    + (f", {fraction} of copy" if fraction != "—" else "")
                )
        print(f"  {shape} {layout} {dtype} {allocator}: " + "; ".join(parts))


def judge_run(
    rows: list[dict],
    load: LoadMonitor,
    ratios: dict,
    group: tuple,
    unit: str,
    min_copy_seconds: float | None = None,
) -> Verdict:
    """Judges every ratio (and, for the bandwidth rows, every fraction of the
    copy) of the run; the verdict whose lines close its output."""
    counts = judge_ratios(rows, group, unit, ratios, load.busy)
    noisy_copies = copies = 0
    if min_copy_seconds is not None:
        judge_copy(rows, load.busy)
        # One copy per case; counted where its fraction is shown.
        shown = {
            tuple(r[key] for key in group if key != "direction"): r["copy_noisy"]
            for r in rows
            if copy_fraction(r, min_copy_seconds) != "—"
        }
        copies, noisy_copies = len(shown), sum(shown.values())
    return verdict(
        load,
        rows=len(rows),
        noisy_rows=sum(bool(r["noisy"]) for r in rows),
        ratios=counts,
        noisy_copies=noisy_copies,
        copies=copies,
    )


def print_verdict(judged: Verdict) -> None:
    """The closing lines: whether the figures hold, and why not."""
    print("", *judged.lines, sep="\n", flush=True)


# ---- --sizes small: per-call cost where overhead decides ----

SMALL_LOG2_SIZES = range(10, 21)


def small_shapes() -> list[tuple[str, tuple[int, ...], int]]:
    """(case, shape, dim) for 2^10 to 2^20 elements: MLP (B, 256) with dim=-1
    and NCHW (B, 16, 8, 8) with dim=1."""
    shapes = []
    for log2 in SMALL_LOG2_SIZES:
        shapes.append(("mlp", (2**log2 // 256, 256), -1))
    for log2 in SMALL_LOG2_SIZES:
        shapes.append(("nchw", (2**log2 // 1024, 16, 8, 8), 1))
    return shapes


def time_per_call(run, device: torch.device, calls: int) -> tuple[float, float]:
    """(seconds per call, host seconds per call) over ``calls`` back-to-back calls:
    on CUDA the first waits for the GPU, the second only for the launches."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = clock()
    for _ in range(calls):
        run()
    host = clock() - t0
    if cuda:
        torch.cuda.synchronize(device)
    return (clock() - t0) / calls, host / calls


def interleaved_timings(runs: dict, device: torch.device, rounds: int) -> dict:
    """name -> (Timing, host seconds) per call of ``runs[name]()``: each round
    times every run once, in a rotating order; the median and the 20th and 80th
    percentiles over rounds, and the median host time."""
    for run in runs.values():  # compiles, warms up
        for _ in range(3):
            run()
    # About 2 ms of calls per measurement.
    calls = {
        name: max(5, min(2000, int(2e-3 / max(time_per_call(run, device, 5)[0], 1e-9))))
        for name, run in runs.items()
    }
    samples = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_per_call(runs[name], device, calls[name]))
    return {
        name: (summarize([t for t, _ in these]), statistics.median(h for _, h in these))
        for name, these in samples.items()
    }


def interleaved_steadily(runs: dict, device, rounds: int, retries: int) -> tuple[dict, int]:
    """(interleaved_timings, attempts): where a provider's timing is noisy, all of
    them are timed again, and the attempt with the fewest noisy providers (then
    the narrowest widest band) kept."""

    def badness(timings):
        return (
            sum(timing.noisy for timing, _ in timings.values()),
            max(timing.relative_spread for timing, _ in timings.values()),
        )

    return steadiest(lambda: interleaved_timings(runs, device, rounds), badness, retries)


def run_small(
    case,
    dims,
    dim,
    dtype,
    device,
    fns: dict,
    rounds: int,
    retries: int = 0,
    load: LoadMonitor | None = None,
) -> list[dict]:
    """Forward and forward+backward of every provider, interleaved."""
    x = torch.randn(dims, dtype=dtype, device=device)
    xg = x.detach().requires_grad_(True)
    grad = torch.randn_like(torch.cat([x, x], dim))

    def forward(fn):
        return lambda: fn(x, dim)

    def forward_backward(fn):
        with torch.no_grad():
            shape = fn(x, dim).shape
        # torch.relu's output has x's shape, the others twice its dim.
        g = grad if shape == grad.shape else torch.randn(shape, dtype=dtype, device=device)
        return lambda: torch.autograd.grad(fn(xg, dim), xg, g)

    steps_by_direction = {"forward": forward, "forward+backward": forward_backward}
    rows = []
    for direction, make_step in steps_by_direction.items():
        # Forward calls run back to back with grad off, as in an inference loop:
        # a torch.no_grad() around each call would cost more than the call.
        with torch.set_grad_enabled(direction != "forward"):
            runs = {name: make_step(fn) for name, fn in fns.items()}
            timings, attempts = interleaved_steadily(runs, device, rounds, retries)
        if load:
            load.sample()
        medians = {name: timing.median for name, (timing, _) in timings.items()}
        for name, (timing, host) in timings.items():
            seconds = timing.median
            rows.append(
                {
                    "case": case,
                    "shape": "x".join(map(str, dims)),
                    "dim": dim,
                    "elements": x.numel(),
                    "dtype": str(dtype).removeprefix("torch."),
                    "direction": direction,
                    "provider": name,
                    "us_per_call": seconds * 1e6,
                    "host_us_per_call": host * 1e6,
                    "speedup_vs_eager": medians["eager"] / seconds if "eager" in medians else "",
                    "speedup_vs_compile": (
                        medians["compile"] / seconds if "compile" in medians else ""
                    ),
                    "cost_vs_relu": seconds / medians["relu"] if "relu" in medians else "",
                    **timing_columns(timing, attempts, "us", 1e6),
                }
            )
    return rows


# The ratio columns of the small sweep: column -> (peer, peer's time over the row's).
SMALL_RATIOS = {
    "speedup_vs_eager": ("eager", True),
    "speedup_vs_compile": ("compile", True),
    "cost_vs_relu": ("relu", False),
}
SMALL_GROUP = ("case", "shape", "dim", "direction")


def print_small_table(rows: list[dict], device: torch.device) -> None:
    """One table per case and direction, each with its header."""
    host = device.type == "cuda"
    print(
        "\nus/call: the median over interleaved rounds. spread: the 20-80 percentile band over "
        f"the median; noisy above {NOISY_SPREAD:.2f}. ~: a ratio that does not hold (a noisy "
        "row, a busy machine, or within the two rows' bands)."
    )
    header = (
        f"{'shape':>14} {'provider':>10} {'us/call':>9} {'spread':>11} "
        + (f"{'host us':>8} " if host else "")
        + f"{'vs eager':>8} {'vs compile':>10} {'x relu':>7}"
    )
    for case, dim, direction in dict.fromkeys((r["case"], r["dim"], r["direction"]) for r in rows):
        print(f"\n{case}, dim={dim}, {direction}")
        print(header)
        print("-" * len(header))
        previous = None
        for r in rows:
            if (r["case"], r["dim"], r["direction"]) != (case, dim, direction):
                continue
            shape = r["shape"] if r["shape"] != previous else ""
            previous = r["shape"]
            print(
                f"{shape:>14} {r['provider']:>10} {r['us_per_call']:9.2f} {spread_cell(r):>11} "
                + (f"{r['host_us_per_call']:8.2f} " if host else "")
                + f"{judged_ratio(r, 'speedup_vs_eager'):>8} "
                + f"{judged_ratio(r, 'speedup_vs_compile'):>10} "
                + f"{judged_ratio(r, 'cost_vs_relu'):>7}"
            )


def print_small_summary(rows: list[dict]) -> None:
    """The worst ratio of each provider over the sizes, per case and direction."""
    print(
        "\nsummary, worst speed-up over 2^10..2^20 elements (eager's time / provider's), "
        "and the cost of a call at the smallest size in torch.relu calls "
        "(~: does not hold, see the closing lines):"
    )
    keys = dict.fromkeys((r["case"], r["direction"], r["provider"]) for r in rows)
    for case, direction, provider in keys:
        if provider in ("eager", "relu"):
            continue
        mine = [
            r
            for r in rows
            if (r["case"], r["direction"], r["provider"]) == (case, direction, provider)
            and r["speedup_vs_eager"] != ""
        ]
        if mine:
            worst = min(mine, key=lambda r: r["speedup_vs_eager"])
            smallest = min(mine, key=lambda r: r["elements"])
            print(
                f"  {case:>4} {direction:>16} {provider:>10}: "
                f"{judged_ratio(worst, 'speedup_vs_eager')} at {worst['elements']} elements; "
                f"{judged_ratio(smallest, 'cost_vs_relu')} relu at {smallest['elements']}"
            )


def plot_small(rows: list[dict], context: dict, path: Path, warning: str | None = None) -> None:
    """Speed-up over eager against elements: a panel per case and direction,
    with the bands of the ratios shaded (eager's 20th percentile over the
    provider's 80th to eager's 80th over its 20th) and noisy points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    fig, axes = plt.subplots(
        len(cases), len(directions), figsize=(12, 4 * len(cases)), sharex=True, squeeze=False
    )
    titles = {"mlp": "MLP (B, 256), dim=-1", "nchw": "NCHW (B, 16, 8, 8), dim=1"}
    for i, case in enumerate(cases):
        for j, direction in enumerate(directions):
            ax = axes[i][j]
            these = [r for r in rows if r["case"] == case and r["direction"] == direction]
            eager = {r["elements"]: r for r in these if r["provider"] == "eager"}

            def band(r, eager=eager):
                if "p20_us" not in r or r["elements"] not in eager:
                    return None
                return ratio_band(row_timing(eager[r["elements"]], "us"), row_timing(r, "us"))

            for provider in dict.fromkeys(r["provider"] for r in these):
                if provider == "eager":
                    continue
                plot_series(
                    ax,
                    [r for r in these if r["provider"] == provider],
                    x=lambda r: r["elements"],
                    y=lambda r: r["speedup_vs_eager"],
                    band=band,
                    style=PROVIDER_STYLES.get(provider, {"marker": "o"}),
                    label=provider,
                )
            ax.axhline(1.0, color="black", linestyle=(0, (6, 3)), linewidth=1.2,
                       label="eager (= 1)")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{titles.get(case, case)}: {direction}")
            ax.set_ylabel("speed-up over eager\n(eager's time per call / provider's)")
            ax.grid(True, which="both", alpha=0.3)
            if i == len(cases) - 1:
                ax.set_xlabel("input elements")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"CReLU per call, {rows[0]['dtype']}, small sizes: {context['device']}, "
        f"torch {context['torch']}, {context['date'][:10]}"
    )
    fig.text(
        0.01,
        0.005,
        "Eager: torch.cat([torch.relu(x), torch.relu(-x)], dim). Each point: median over "
        "interleaved rounds of back-to-back calls; above 1 the provider is faster than eager.\n"
        "Shaded: the ratio's band, eager's 20th percentile over the provider's 80th to eager's "
        "80th over its 20th; ringed: a noisy provider.",
        fontsize=8.5,
    )
    fig.tight_layout(rect=(0, 0.045, 1, 0.95 if warning else 1))
    warn_on_plot(fig, warning)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_shape(spec: str) -> Shape:
    dims, _, layout = spec.partition(":")
    return Shape(f"custom {dims}", tuple(int(d) for d in dims.split(",")), layout or "contiguous")


def run_small_sweep(args, device: torch.device, dtype, context: dict, load: LoadMonitor) -> None:
    from tqdm import tqdm

    names = args.providers.split(",") if args.providers else None
    fns = providers(device, names or [*available_native(device), "relu", "eager", "compile"])
    shapes = small_shapes()
    rows = []
    progress = tqdm(shapes, desc="bench small", file=sys.stderr, bar_format=PROGRESS_FORMAT)
    for case, dims, dim in progress:
        progress.set_postfix_str(f"{case} {'x'.join(map(str, dims))}")
        rows += run_small(case, dims, dim, dtype, device, fns, args.reps, args.retries, load)
    load.finish()
    judged = judge_run(rows, load, SMALL_RATIOS, SMALL_GROUP, "us")
    print_small_table(rows, device)
    print_small_summary(rows)
    save_and_close(
        args,
        judged,
        rows,
        {**context, **load.context()},
        f"bench_small_{device.type}.csv",
        lambda path, warning: plot_small(rows, context, path, warning) or True,
        f"small_{device.type}.png",
    )


def save_and_close(args, judged, rows, context, csv_name, plot, plot_name) -> None:
    """Saves the rows and the plot (unless --no-save), then prints the verdict:
    the output's last lines."""
    sys.stdout.flush()  # the tables before the messages on stderr, in one log
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        csv_path = args.out / csv_name
        append_results(rows, context, csv_path)
        print(f"appended to {csv_path}", file=sys.stderr)
        plot_path = args.out / plot_name
        warning = None if judged.reliable else judged.headline.partition(". Every")[0]
        if plot(plot_path, warning):
            print(f"plot: {plot_path}", file=sys.stderr)
    sys.stderr.flush()
    print_verdict(judged)


def import_cpp_extension_quietly() -> None:
    """torch.compile's CPU code generation imports torch.utils.cpp_extension,
    which logs "No CUDA runtime is found" where a CUDA toolkit is installed but
    no GPU is: irrelevant to a CPU benchmark, and printed in the middle of its
    progress bar. Imported here first, with that logger muted."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def available_native(device: torch.device) -> list[str]:
    """The fused backends on ``device``."""
    return [b for b in available_backends(device) if b != "reference"]


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
        "--retries",
        type=int,
        default=1,
        help="times a noisy measurement is taken again, the narrowest kept (default 1; "
        "0: noisy rows are only marked)",
    )
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
    parser.add_argument(
        "--sizes",
        choices=["large", "small"],
        default="large",
        help="large: bandwidth at the shapes above (default); small: time per call at "
        "2^10..2^20 elements, MLP (B, 256) dim=-1 and NCHW dim=1",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"results folder (default {DEFAULT_OUT}/, untracked); --out benchmarks/results "
        "refreshes the committed figures",
    )
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
    if not torch.cuda.is_available():
        import_cpp_extension_quietly()
    # The threads that run at once: torch's on the CPU, the launching one on a GPU.
    load = LoadMonitor.begin(threads=context["threads"] if device.type == "cpu" else 1)
    if args.sizes == "small":
        run_small_sweep(args, device, getattr(torch, args.dtype), context, load)
        return
    fns = providers(device, args.providers.split(",") if args.providers else None)
    measure = timer(device, args.reps)
    min_copy_seconds = COPY_MIN_FIXED_COSTS * fixed_copy_seconds(device, measure)
    if device.type == "cuda":
        allocators = ["caching"]
    else:
        allocators = ["system", "reuse"] if args.allocator == "both" else [args.allocator]
    rows = []
    total = len(allocators) * len(shapes) * len(dtypes)
    progress = tqdm(total=total, desc="bench", file=sys.stderr, bar_format=PROGRESS_FORMAT)
    for allocator in allocators:
        # glibc cannot go back once it reuses memory, so "system" runs first.
        if allocator == "reuse" and not use_reusing_allocator():
            print("cannot make the allocator reuse memory here; skipped", file=sys.stderr)
            progress.update(len(shapes) * len(dtypes))
            continue
        for dtype in dtypes:
            for shape in shapes:
                progress.set_postfix_str(f"{shape.name}, {dtype_name(dtype)}, {allocator}")
                rows += run_shape(shape, dtype, device, fns, measure, allocator, args.retries, load)
                progress.update()
    progress.close()
    load.finish()
    judged = judge_run(rows, load, LARGE_RATIOS, LARGE_GROUP, "ms", min_copy_seconds)
    print_table(rows, min_copy_seconds)
    print_summary(rows, min_copy_seconds)
    save_and_close(
        args,
        judged,
        rows,
        {**context, **load.context()},
        f"bench_{device.type}.csv",
        lambda path, warning: plot_bandwidth(rows, context, path, warning),
        f"bandwidth_{device.type}.png",
    )


if __name__ == "__main__":
    main()
