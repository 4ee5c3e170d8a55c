"""The benchmark runs end to end as a user would start it, on tiny shapes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crelu_ext
from crelu_ext.bench import harness as bench


def test_bench_writes_results_and_plot(tmp_path, capsys):
    providers = ",".join([*crelu_ext.available_backends("cpu")[:-1], "eager"])
    bench.main(
        ["--device", "cpu", "--reps", "3", "--providers", providers, "--allocator", "system",
         "--shape", "2,8,4,4", "--shape", "1,64,2,3:channels_last", "--out", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr()
    table = printed.out
    # One table per direction, each under its header, in this order, then the summary.
    headers = [f"\n{d}, float32, system allocator\n" for d in bench.DIRECTIONS]
    assert all(header in table for header in headers)
    starts = [table.index(header) for header in headers]
    assert starts == sorted(starts)
    assert "eager" in table[starts[0] : starts[1]]
    # Copies of these few bytes take about as long as a one-element copy: no fraction.
    assert "—" in table and "%" not in table
    if "native" in providers:  # the closing summary, one line per shape
        summary = table[table.index("summary") :]
        assert table.index("summary") > starts[-1]
        assert "2x8x4x4 contiguous float32 system: forward" in summary
        assert "1x64x2x3 channels_last" in summary and "of copy" not in summary
    assert "2/2 cases" in printed.err and "remaining" not in printed.err
    with (tmp_path / "bench_cpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * len(providers.split(","))  # shapes x directions x providers
    assert {row["direction"] for row in rows} == set(bench.DIRECTIONS)
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["gbps"]) > 0
        assert row["command"].startswith("python -m crelu_ext bench")
        # The spread beside the median, and the machine's state (tests/tools/test_bench_noise.py).
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        assert row["noisy"] in ("True", "False") and int(row["attempts"]) >= 1
        assert int(row["cores"]) >= 1 and row["busy"] in ("True", "False")
    # The output ends with the verdict on its noise: a headline, the load, rows and ratios.
    lines = table.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if not line.startswith("  "))
    assert lines[start].startswith(("Figures hold", "UNRELIABLE")) and len(lines) - start <= 6
    assert [line.split(":")[0] for line in lines[start + 1 : start + 4]] == [
        "  load",
        "  rows",
        "  ratios",
    ]
    eager = next(row for row in rows if row["provider"] == "eager")
    assert float(eager["saved_bytes_per_element"]) >= 8  # two float32 relu outputs
    if "native" in providers:
        native = next(row for row in rows if row["provider"] == "native")
        assert float(native["saved_bytes_per_element"]) <= 0.5  # the 2-bit mask, padded


def test_copy_fraction_only_where_the_copy_is_long_enough():
    row = {"fraction_of_copy": 0.5, "copy_gbps": 10.0}
    # The copy reads and writes the output, twice the input: 4 x input bytes.
    min_seconds = 1e-4
    long_enough = min_seconds * 10e9 / 4
    assert bench.copy_fraction({**row, "input_bytes": long_enough}, min_seconds) == "0.50"
    assert bench.copy_fraction({**row, "input_bytes": long_enough / 2}, min_seconds) == "—"
    fixed = bench.fixed_copy_seconds(torch.device("cpu"), bench.timer(torch.device("cpu"), 5))
    assert 0 < fixed < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without a GPU")
def test_no_cuda_runtime_warning_is_kept_off_the_progress_bar():
    def stderr_of(code: str) -> str:
        # CUDA_HOME set: torch.utils.cpp_extension then warns on import without a GPU.
        package_root = str(Path(crelu_ext.__file__).resolve().parents[1])
        env = {**os.environ, "CUDA_HOME": "/usr/local/cuda", "PYTHONPATH": package_root}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stderr

    warning = "No CUDA runtime is found"
    assert warning in stderr_of("import torch.utils.cpp_extension")
    quiet = "from crelu_ext.bench import harness; harness.import_cpp_extension_quietly()"
    assert warning not in stderr_of(quiet + "; import torch.utils.cpp_extension")


def test_plot_covers_the_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"case": "sweep 1", "shape": f"8x64x{side}x{side}", "layout": "contiguous",
         "dtype": "float32", "allocator": "reuse", "direction": direction, "provider": provider,
         "input_bytes": 8 * 64 * side * side * 4, "gbps": gbps, "copy_gbps": 10.0}
        for direction in bench.DIRECTIONS
        for provider, gbps in [("native", 8.0), ("eager", 2.0)]
        for side in (8, 16)
    ]  # fmt: skip
    context = {"device": "test", "torch": "x", "date": "2026-11-28T00:00:00"}
    assert bench.plot_bandwidth(rows, context, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    # With the runs' bands, noisy points and a warning.
    for row in rows:
        row.update(median_ms=1.0, p20_ms=0.9, p80_ms=1.2, noisy=row["provider"] == "eager")
        row.update(copy_median_ms=2.0, copy_p20_ms=1.0, copy_p80_ms=3.0, copy_noisy=True)
    assert bench.plot_bandwidth(rows, context, tmp_path / "bands.png", "UNRELIABLE: test")
    assert (tmp_path / "bands.png").stat().st_size > (tmp_path / "plot.png").stat().st_size


def test_small_sweep_times_every_size_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    providers = [*crelu_ext.available_backends("cpu")[:-1], "eager"]
    # --retries 0: three rounds are often noisy, and a rerun of each would double the time.
    bench.main(
        ["--device", "cpu", "--sizes", "small", "--reps", "3", "--retries", "0", "--providers",
         ",".join(providers), "--out", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    headers = ["\nmlp, dim=-1, forward\n", "\nnchw, dim=1, forward+backward\n"]
    assert all(header in printed for header in headers)
    assert printed.index("worst speed-up") > printed.index(headers[-1])
    assert printed.index("\n  rows: ") > printed.index("worst speed-up")
    with (tmp_path / "bench_small_cpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    shapes = bench.small_shapes()
    assert len(rows) == len(shapes) * 2 * len(providers)  # shapes x directions x providers
    assert {int(row["elements"]) for row in rows} == {2**k for k in bench.SMALL_LOG2_SIZES}
    assert {(row["case"], row["dim"]) for row in rows} == {("mlp", "-1"), ("nchw", "1")}
    for row in rows:
        assert float(row["us_per_call"]) > 0
        assert float(row["p20_us"]) <= float(row["us_per_call"]) <= float(row["p80_us"])
        assert row["attempts"] == "1" and "load_start" in row and "others_runnable" in row
        assert row["command"].startswith("python -m crelu_ext bench --device cpu --sizes small")
    assert (tmp_path / "small_cpu.png").stat().st_size > 10_000


def test_default_results_folder_is_untracked():
    # `make bench` must leave the checkout clean.
    gitignore = Path(__file__).resolve().parents[2] / ".gitignore"
    if not gitignore.exists():
        pytest.skip("not a source checkout")
    assert f"{bench.DEFAULT_OUT}/" in gitignore.read_text().split()
