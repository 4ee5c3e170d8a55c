"""The benchmark's noise judgement: its decisions on synthetic samples and load figures,
and the harness's own loop with a synthetic clock and load, so that nothing here depends
on how busy the machine running the tests is."""

import csv
import itertools

import pytest
import torch

import crelu_ext
from crelu_ext.bench import harness as bench
from crelu_ext.bench import noise

MS = 1e-3


def timing(*times_ms: float) -> noise.Timing:
    return noise.summarize([t * MS for t in times_ms])


QUIET = [1.00, 1.01, 0.99, 1.02, 1.00, 0.98, 1.01, 1.00, 0.99, 1.03]  # about 1 ms
HALF = [t / 2 for t in QUIET]  # twice as fast, as steady
BIMODAL = [1.0, 2.0] * 5  # every other run delayed, as by a time slice lost


def test_quantiles_are_the_20th_and_80th_percentiles():
    t = noise.summarize([float(i) for i in range(11)])  # 0 ... 10
    assert (t.median, t.low, t.high, t.samples) == (5.0, 2.0, 8.0, 11)
    assert t.spread == 3.0 and t.relative_spread == pytest.approx(6 / 5)
    assert noise.summarize([2.0]) == noise.Timing(2.0, 2.0, 2.0, 1)


def test_quiet_samples_are_steady_and_a_bimodal_set_is_noisy():
    assert not timing(*QUIET).noisy
    assert not timing(*HALF).noisy
    bimodal = timing(*BIMODAL)
    assert bimodal.noisy and bimodal.relative_spread == pytest.approx(1 / 1.5)
    # One outlier in ten leaves the 20-80 band alone: the median is robust to it.
    assert not timing(*QUIET[:-1], 50.0).noisy
    # The threshold: a band of exactly a quarter of the median is not noisy yet.
    assert not noise.Timing(1.0, 0.875, 1.125).noisy
    assert noise.Timing(1.0, 0.87, 1.125).noisy


def test_a_ratio_holds_only_where_the_bands_part_and_both_rows_are_steady():
    slow, fast = timing(*QUIET), timing(*HALF)
    assert noise.judge_ratio(slow, fast, busy=False) == "holds"  # 2x faster
    assert noise.judge_ratio(fast, slow, busy=False) == "holds"  # 2x slower, as sure
    low, high = noise.ratio_band(slow, fast)
    assert 1 < low < 2 < high
    # 2 % apart with bands of 3 %: the two cannot be told apart.
    close = timing(*(t * 1.02 for t in QUIET))
    assert noise.judge_ratio(close, slow, busy=False) == "within spread"
    # A noisy row spoils every ratio it is in, however far apart the medians.
    assert noise.judge_ratio(timing(*(10 * t for t in BIMODAL)), fast, busy=False) == "noisy"
    assert noise.judge_ratio(slow, fast, busy=True) == "busy"
    assert noise.mark("2.00x", True) == "2.00x" and noise.mark("2.00x", False) == "~2.00x"


def test_load_above_the_free_cores_makes_the_machine_busy():
    # Sampled during the run: other processes' runnable threads.
    quiet = noise.LoadMonitor(threads=2, cores=2, start=3.0, end=2.1, samples=[0, 0, 1, 0])
    assert not quiet.busy  # the load average's history does not count where samples exist
    busy = noise.LoadMonitor(threads=2, cores=2, start=0.2, end=2.4, samples=[2, 2, 1, 3])
    assert busy.busy and busy.others == 2.0
    # Threads that leave cores free tolerate other work on them.
    assert not noise.LoadMonitor(threads=2, cores=8, samples=[6, 6]).busy
    assert noise.LoadMonitor(threads=2, cores=8, samples=[7, 6.5]).busy  # 6.75 > 6 + 0.5


def test_without_samples_the_load_average_decides():
    # The start: the minute before the run, other work only.
    assert noise.LoadMonitor(threads=2, cores=2, start=2.5, end=2.0).busy
    # The end counts the benchmark's own threads: 2.4 less 2 is within the tolerance.
    assert not noise.LoadMonitor(threads=2, cores=2, start=0.1, end=2.4).busy
    assert noise.LoadMonitor(threads=2, cores=2, start=0.1, end=4.7).busy
    # The user's report: load 2.5 to 4.7 on 2 cores with 2 threads.
    report = noise.LoadMonitor(threads=2, cores=2, start=2.5, end=4.7)
    assert report.busy and report.others == pytest.approx(2.7)
    # No figures at all (no load average on this OS): not called busy.
    assert not noise.LoadMonitor(threads=2, cores=2).busy


def test_other_runnable_threads_from_proc(tmp_path):
    (tmp_path / "loadavg").write_text("1.00 0.50 0.20 5/300 1234\n")
    tasks = tmp_path / "self" / "task"
    for tid, stat in {"1": "1 (python) R 0 1", "2": "2 (a (b) c) R 0", "3": "3 (x) S 0"}.items():
        (tasks / tid).mkdir(parents=True)
        (tasks / tid / "stat").write_text(stat)
    assert noise.other_runnable_threads(tmp_path) == 3  # 5 runnable, 2 of them ours
    assert noise.other_runnable_threads(tmp_path / "missing") is None


def test_verdicts():
    ratios = {"holds": 90, "within spread": 3, "noisy": 3}
    quiet = noise.LoadMonitor(threads=2, cores=2, start=0.3, end=2.0, samples=[0.0, 0.0])
    clean = noise.verdict(quiet, rows=48, noisy_rows=2, ratios=ratios)
    assert clean.reliable and "UNRELIABLE" not in "\n".join(clean.lines)
    assert clean.headline.startswith("Figures hold where not marked ~")
    assert clean.lines[2].startswith("  rows: 2 of 48 noisy")
    assert clean.lines[3].startswith("  ratios: 90 of 96 hold; 3 within their two rows' bands")
    busy = noise.LoadMonitor(threads=2, cores=2, start=0.3, end=4.0, samples=[2.0, 2.0])
    loaded = noise.verdict(busy, rows=48, noisy_rows=2, ratios={"busy": 96})
    assert not loaded.reliable
    assert loaded.headline.startswith("UNRELIABLE: busy machine, other work's load 2.00")
    assert "2 benchmark threads" in loaded.headline
    assert loaded.lines[3].startswith("  ratios: 0 of 96 hold")
    # More than a quarter of the rows noisy make a run unreliable on a quiet machine too.
    assert noise.verdict(quiet, rows=48, noisy_rows=12, ratios=ratios).reliable
    noisy = noise.verdict(quiet, rows=48, noisy_rows=13, ratios=ratios)
    assert not noisy.reliable and "13 of 48 rows noisy" in noisy.headline
    # A noisy copy is said so.
    copy = noise.verdict(quiet, 48, 0, ratios, noisy_copies=1, copies=6)
    assert "  copy: the same-run copy noisy in 1 of 6 cases" in copy.lines[4]


TICK = 2**-10  # about a millisecond, and sums of it are exact in floating point


class FakeClock:
    """Each pair of calls (start, stop) of a measurement spans the next number of ticks."""

    def __init__(self, *ticks: int):
        self.ticks, self.calls, self.durations = 0, 0, itertools.cycle(ticks)

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.ticks += next(self.durations)
        return self.ticks * TICK


def run_bench(monkeypatch, tmp_path, capsys, clock, others: float, load: float) -> tuple:
    """The harness on one tiny shape, timed by ``clock``, on a machine where other
    work keeps ``others`` threads runnable and the load average is ``load``; as many
    cores as torch's threads. (printed output, CSV rows)"""
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("the native CPU backend is not built")
    monkeypatch.setattr(bench, "clock", clock)
    monkeypatch.setattr(noise, "other_runnable_threads", lambda: others)
    monkeypatch.setattr(noise, "load_average", lambda: load)
    monkeypatch.setattr(noise, "cores", torch.get_num_threads)
    bench.main(
        ["--device", "cpu", "--reps", "10", "--providers", "native,eager", "--allocator",
         "reuse", "--shape", "2,8,4,4", "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    with (tmp_path / "bench_cpu.csv").open() as f:
        return out, list(csv.DictReader(f))


def test_a_quiet_run_holds(monkeypatch, tmp_path, capsys):
    out, rows = run_bench(monkeypatch, tmp_path, capsys, FakeClock(1), others=0.0, load=0.2)
    last = out.strip().splitlines()[-4:]
    assert last[0].startswith("Figures hold where not marked ~")
    assert last[1].startswith("  load: other work kept 0.00 threads runnable")
    assert last[2].startswith("  rows: 0 of 6 noisy")
    for row in rows:
        assert row["noisy"] == "False" and row["attempts"] == "1" and row["busy"] == "False"
        assert float(row["p20_ms"]) == float(row["median_ms"]) == float(row["p80_ms"])
        assert (row["load_start"], row["load_end"], row["others_runnable"]) == ("0.2", "0.2", "0.0")
    # Both providers took the same time: ties, marked so, with no reason to distrust the run.
    assert last[3].startswith("  ratios: 0 of 3 hold; 3 within their two rows' bands")
    assert "forward ~1.00x eager" in out
    assert all(row["speedup_vs_eager_holds"] in ("", "False") for row in rows)


def test_a_loaded_run_says_it_is_unreliable(monkeypatch, tmp_path, capsys):
    # Every other run takes three times as long, and two other threads want the cores.
    out, rows = run_bench(monkeypatch, tmp_path, capsys, FakeClock(1, 3), others=2.0, load=4.7)
    last = out.strip().splitlines()[-5:]
    assert last[0].startswith("UNRELIABLE: busy machine, other work's load 2.00 over the 0 cores")
    assert "6 of 6 rows noisy" in last[0]
    assert "load average 4.70 at the start, 4.70 at the end" in last[1]
    assert last[-1].startswith("  Compare providers only in a run on a quiet machine")
    assert "forward ~" in out[out.index("\nsummary") :]
    for row in rows:
        assert row["noisy"] == "True" and row["busy"] == "True"
        assert row["attempts"] == "2"  # taken again once (--retries 1), noisy still
        assert float(row["relative_spread"]) == 1.0  # 1 to 3 ticks, median 2
        assert row["fraction_of_copy_holds"] == "False" and row["copy_noisy"] == "True"
        assert row["speedup_vs_eager_holds"] in ("", "False")
