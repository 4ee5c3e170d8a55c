"""The benchmark runs end to end as a user would start it, on tiny shapes."""

import csv
from pathlib import Path

import pytest

import crelu_ext
from crelu_ext.bench import harness as bench


def test_bench_writes_results_and_plot(tmp_path, capsys):
    providers = ",".join([*crelu_ext.available_backends("cpu")[:-1], "eager"])
    bench.main(
        ["--device", "cpu", "--reps", "3", "--providers", providers, "--allocator", "system",
         "--shape", "2,8,4,4", "--shape", "1,64,2,3:channels_last", "--out", str(tmp_path)]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "forward+backward" in table and "eager" in table
    if "native" in providers:  # the closing summary, one line per shape
        summary = table[table.index("summary") :]
        assert "2x8x4x4 contiguous float32 system: forward" in summary
        assert "1x64x2x3 channels_last" in summary and "of copy" in summary
    with (tmp_path / "bench_cpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * len(providers.split(","))  # shapes x directions x providers
    assert {row["direction"] for row in rows} == set(bench.DIRECTIONS)
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["gbps"]) > 0
        assert row["command"].startswith("python -m crelu_ext bench")
    eager = next(row for row in rows if row["provider"] == "eager")
    assert float(eager["saved_bytes_per_element"]) >= 8  # two float32 relu outputs
    if "native" in providers:
        native = next(row for row in rows if row["provider"] == "native")
        assert float(native["saved_bytes_per_element"]) <= 0.5  # the 2-bit mask, padded


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


def test_small_sweep_times_every_size_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    providers = [*crelu_ext.available_backends("cpu")[:-1], "eager"]
    bench.main(
        ["--device", "cpu", "--sizes", "small", "--reps", "3", "--providers", ",".join(providers),
         "--out", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "worst speed-up" in printed
    with (tmp_path / "bench_small_cpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    shapes = bench.small_shapes()
    assert len(rows) == len(shapes) * 2 * len(providers)  # shapes x directions x providers
    assert {int(row["elements"]) for row in rows} == {2**k for k in bench.SMALL_LOG2_SIZES}
    assert {(row["case"], row["dim"]) for row in rows} == {("mlp", "-1"), ("nchw", "1")}
    for row in rows:
        assert float(row["us_per_call"]) > 0
        assert row["command"].startswith("python -m crelu_ext bench --device cpu --sizes small")
    assert (tmp_path / "small_cpu.png").stat().st_size > 10_000


def test_default_results_folder_is_untracked():
    # `make bench` must leave the checkout clean.
    gitignore = Path(__file__).resolve().parents[2] / ".gitignore"
    if not gitignore.exists():
        pytest.skip("not a source checkout")
    assert f"{bench.DEFAULT_OUT}/" in gitignore.read_text().split()
