"""The CPU forward's store paths: the fused kernel against a minimal
hand-written AVX-512 loop, torch.compile and a same-run copy, in one process.

    python benchmarks/cpu_store_paths.py paths --out benchmarks/results/cpu_store_paths.csv
    python benchmarks/cpu_store_paths.py sweep --out benchmarks/results/cpu_store_paths.csv

``paths``: forward of a (64, 64, 56, 56) float32 tensor, dim=1, no grad (a
100 MB output). ``sweep``: forward at 2^16 to 2^24 elements, shape
(8, C, 32, 32), where the output moves from L2 through the last-level cache
to memory. Providers:

- native: ``torch.ops.crelu_ext.crelu.default(x, 1, False)[0]``;
- compile: ``torch.compile`` of ``cat([relu(x), relu(-x)], 1)``, default settings;
- loop-stream, loop-plain: x -> [relu(x), relu(-x)] per row, 16 floats a
  step, two OpenMP threads (as many as torch uses), with non-temporal or
  ordinary stores: what the memory system allows, without any bookkeeping;
- copy: ``dst.copy_(src)`` into a preallocated tensor of the output's size.

Interleaved: each round times every provider once, in a rotating order, as a
batch of back-to-back calls of about 2 ms; medians over the rounds. The
output memory comes from glibc's malloc, by default made to reuse freed
blocks ("reuse", as caching allocators do), or as the system gives it
("system": fresh pages over 32 MB); see crelu_ext.bench.harness.

Ratios are speed-ups, the other's time / native's: above 1 native is faster.
``vs copy`` compares times too; a copy moves 4 bytes per output element
(read and write), the forward 3 (read half, write all), so a forward that
ran at the copy's bandwidth would score 1.33.
"""

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crelu_ext import reference
from crelu_ext.bench.harness import use_reusing_allocator

LOOP_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

// x: contiguous float32, dim=1: rows of inner = numel / size(0) elements,
// each written to out[o][0] as relu(x) and to out[o][1] as relu(-x).
torch::Tensor crelu_loop(const torch::Tensor& x, bool streaming, int64_t threads) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat && x.dim() >= 2);
  const int64_t outer = x.size(0);
  const int64_t inner = x.numel() / outer;
  TORCH_CHECK(inner % 16 == 0, "rows must be whole vectors");
  auto sizes = x.sizes().vec();
  sizes[1] *= 2;
  torch::Tensor out = torch::empty(sizes, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dst) % 64 == 0);
  const int64_t vectors = x.numel() / 16;
  // max(0, v) returns v where v is NaN or a zero of either sign, as relu does.
  const __m512 zero = _mm512_setzero_ps();
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t flat = vectors * t / n * 16;
    const int64_t end = vectors * (t + 1) / n * 16;
    while (flat < end) {
      const int64_t o = flat / inner, r = flat % inner;
      const int64_t count = std::min(end - flat, inner - r);
      const float* s = src + flat;
      float* pos = dst + o * 2 * inner + r;
      float* neg = pos + inner;
      if (streaming) {
        for (int64_t e = 0; e < count; e += 16) {
          const __m512 v = _mm512_loadu_ps(s + e);
          const __m512 m = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
          _mm512_stream_ps(pos + e, _mm512_max_ps(zero, v));
          _mm512_stream_ps(neg + e, _mm512_max_ps(zero, m));
        }
      } else {
        for (int64_t e = 0; e < count; e += 16) {
          const __m512 v = _mm512_loadu_ps(s + e);
          const __m512 m = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
          _mm512_store_ps(pos + e, _mm512_max_ps(zero, v));
          _mm512_store_ps(neg + e, _mm512_max_ps(zero, m));
        }
      }
      flat += count;
    }
    _mm_sfence();
  }
  return out;
}
"""


def build_loop():
    """The hand-written loop, compiled once into a build folder that later
    runs reuse."""
    from torch.utils.cpp_extension import load_inline

    build_dir = Path(tempfile.gettempdir()) / "crelu_ext_cpu_store_paths"
    build_dir.mkdir(exist_ok=True)
    module = load_inline(
        "crelu_cpu_store_paths",
        cpp_sources=LOOP_SOURCE,
        functions=["crelu_loop"],
        extra_cflags=["-O3", "-mavx512f", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )
    return module.crelu_loop


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def last_level_cache() -> str:
    """The largest data cache the OS reports for CPU 0, e.g. "L3 307200K"."""
    caches = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "type").read_text().strip() in ("Data", "Unified"):
            level = int((index / "level").read_text())
            caches.append((level, f"L{level} {(index / 'size').read_text().strip()}"))
    return max(caches)[1] if caches else "unknown"


def providers(x: torch.Tensor, names: list[str]) -> dict:
    """name -> zero-argument call, each the forward of x (or the copy)."""
    loop = build_loop() if any(n.startswith("loop") for n in names) else None
    threads = torch.get_num_threads()
    compiled = torch.compile(reference.crelu, dynamic=False)
    out_shape = list(x.shape)
    out_shape[1] *= 2
    src, dst = torch.randn(out_shape), torch.empty(out_shape)
    available = {
        "native": lambda: torch.ops.crelu_ext.crelu.default(x, 1, False)[0],
        "compile": lambda: compiled(x, 1),
        "loop-stream": lambda: loop(x, True, threads),
        "loop-plain": lambda: loop(x, False, threads),
        "copy": lambda: dst.copy_(src),
    }
    return {name: available[name] for name in names}


def check_exact(fns: dict, x: torch.Tensor) -> None:
    """The fused kernel and the loop match the composition bit for bit, also
    on zeros of both signs and NaN (torch.compile need not: it is a peer)."""
    special = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), 1.0, -1.0])
    x[0].view(-1)[: special.numel()] = special
    expected = reference.crelu(x, 1).view(torch.int32)
    for name, fn in fns.items():
        if name not in ("copy", "compile") and not torch.equal(fn().view(torch.int32), expected):
            raise SystemExit(f"{name} differs from the composition")
    x.copy_(torch.randn_like(x))


def time_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(fns: dict, rounds: int) -> dict:
    """name -> median seconds per call over interleaved rounds."""
    for fn in fns.values():  # compiles, and lets the allocator settle
        time_per_call(fn, 3)
    calls = {name: max(1, min(1000, int(2e-3 / time_per_call(fn, 3)))) for name, fn in fns.items()}
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_per_call(fns[name], calls[name]))
    return {name: statistics.median(these) for name, these in samples.items()}


def run_case(dims: tuple[int, ...], names: list[str], rounds: int) -> list[dict]:
    x = torch.randn(dims)
    fns = providers(x, names)
    check_exact(fns, x)
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        medians = measure(fns, rounds)
    load_after = os.getloadavg()[0]
    rows = []
    for name, seconds in medians.items():
        row = {
            "shape": "x".join(map(str, dims)),
            "elements": x.numel(),
            "output_bytes": 2 * x.numel() * x.element_size(),
            "provider": name,
            "median_us": seconds * 1e6,
            "load_1min_before": load_before,
            "load_1min_after": load_after,
        }
        for peer in ("loop-stream", "loop-plain", "copy", "compile"):
            if "native" in medians and peer in medians:
                row[f"native_vs_{peer}"] = medians[peer] / medians["native"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["paths", "sweep"])
    parser.add_argument("--allocator", choices=["reuse", "system"], default="reuse")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--providers", help="comma-separated subset (default: all)")
    parser.add_argument("--log2", help="sweep sizes, e.g. 19,20,20.5 (default 16 to 24)")
    parser.add_argument("--label", default="", help="a note stored with each row")
    parser.add_argument("--out", type=Path, help="append the rows to this CSV")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if args.allocator == "reuse" and not use_reusing_allocator():
        raise SystemExit("cannot make glibc's malloc reuse memory here")
    torch._dynamo.config.recompile_limit = 64
    names = (args.providers or "native,compile,loop-stream,loop-plain,copy").split(",")
    if args.mode == "paths":
        shapes = [(64, 64, 56, 56)]
    else:
        log2s = [float(s) for s in args.log2.split(",")] if args.log2 else range(16, 25)
        shapes = [(8, round(2 ** (k - 13)), 32, 32) for k in log2s]
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "llc_reported": last_level_cache(),
        "torch": torch.__version__,
        "allocator": args.allocator,
        "label": args.label,
        "command": " ".join(["python", "benchmarks/cpu_store_paths.py", *argv]),
    }
    print(" | ".join(f"{k} {v}" for k, v in context.items()), file=sys.stderr)
    rows = []
    for dims in shapes:
        rows += run_case(dims, names, args.rounds)
    ratio_keys = [k for k in rows[0] if k.startswith("native_vs_")]
    print(f"{'shape':>14} {'provider':>12} {'median us':>10} {'load':>10}  " + " ".join(ratio_keys))
    for r in rows:
        ratios = " ".join(f"{r.get(k, 0):.2f}x".rjust(len(k)) for k in ratio_keys)
        load = f"{r['load_1min_before']:.2f}/{r['load_1min_after']:.2f}"
        print(f"{r['shape']:>14} {r['provider']:>12} {r['median_us']:10.1f} {load:>10}  {ratios}")
    if args.out:
        fields = [*context, *rows[0]]
        new_file = not args.out.exists()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({**context, **row})


if __name__ == "__main__":
    main()
