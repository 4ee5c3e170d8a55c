"""How the benchmark judges its own noise: functions of timing samples and load figures,
with no timing of their own (the tests feed them synthetic samples).

A measurement is its median and its 20th and 80th percentiles (``Timing``): the band
between them holds the middle 60 % of the timed runs, as Triton's ``do_bench`` reports
with ``quantiles=[0.5, 0.2, 0.8]``. Three rules decide what the benchmark may claim:

- A row is *noisy* when its band is wider than ``NOISY_SPREAD`` (a quarter) of its
  median: for normally distributed times that is a standard deviation of about 15 % of
  the median, where pyperf already warns that a benchmark "seems unstable" at 10 %.
- A ratio of two rows *holds* when neither row is noisy, the machine was not busy, and
  the two bands do not overlap: the ratio's own band, from the bands' ends
  (numerator p20 / denominator p80 to numerator p80 / denominator p20), then lies wholly
  on one side of 1. Else the ratio is printed with a ``~`` prefix.
- The machine is *busy* when other work kept more threads runnable than the cores the
  benchmark's threads leave free, by more than ``BUSY_TOLERANCE`` of a core. Other work
  is counted, where Linux tells, as the runnable threads of other processes sampled after
  every measurement (``/proc/loadavg`` less this process's running threads); elsewhere
  from the 1-minute load average, at the start as it is (the minute before the run) and at
  the end less the benchmark's own threads.
"""

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

NOISY_SPREAD = 0.25
BUSY_TOLERANCE = 0.5
# Noisy rows beyond this share of a run make the whole run unreliable; up to it only
# those rows (and the ratios that use them) are marked: on a quiet machine the tiniest
# cases, a few microseconds of fixed costs, come out noisy now and then.
NOISY_SHARE_LIMIT = 0.25


@dataclass(frozen=True)
class Timing:
    """Seconds: the median and the 20th (``low``) and 80th (``high``) percentiles."""

    median: float
    low: float
    high: float
    samples: int = 0  # 0: not known (Triton's do_bench does not say)

    @property
    def spread(self) -> float:
        """Half the 20-80 percentile range, the harness's ``spread`` column."""
        return (self.high - self.low) / 2

    @property
    def relative_spread(self) -> float:
        """The band's width over the median."""
        return (self.high - self.low) / self.median if self.median > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.relative_spread > NOISY_SPREAD


def summarize(times: list[float]) -> Timing:
    """The median and the 20th and 80th percentiles of ``times`` (linear interpolation
    between the sorted samples, as numpy's default)."""
    if not times:
        raise ValueError("no samples")
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7], len(times))


def ratio_band(numerator: Timing, denominator: Timing) -> tuple[float, float]:
    """The range of ``numerator / denominator`` over the two bands."""
    return numerator.low / denominator.high, numerator.high / denominator.low


JUDGEMENTS = ("holds", "within spread", "noisy", "busy")


def judge_ratio(numerator: Timing, denominator: Timing, busy: bool) -> str:
    """Whether ``numerator.median / denominator.median`` holds: "holds", or why not:
    "busy" (the machine), "noisy" (a row's own spread), "within spread" (the bands
    overlap: the two cannot be told apart)."""
    if busy:
        return "busy"
    if numerator.noisy or denominator.noisy:
        return "noisy"
    low, high = ratio_band(numerator, denominator)
    return "holds" if low > 1 or high < 1 else "within spread"


def mark(text: str, holds: bool) -> str:
    """``text`` as printed: with a ``~`` prefix where the figure does not hold."""
    return text if holds else f"~{text}"


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def other_runnable_threads(proc: Path = Path("/proc")) -> float | None:
    """Threads of other processes runnable right now (Linux: the runnable count of
    ``/proc/loadavg`` less this process's threads in state R), or None."""
    try:
        runnable = int((proc / "loadavg").read_text().split()[3].partition("/")[0])
        tasks = list((proc / "self" / "task").iterdir())
    except (OSError, IndexError, ValueError):
        return None
    mine = 0
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread has ended
            continue
        # "pid (comm) S ...": the state follows the last parenthesis.
        mine += stat.rpartition(")")[2].split()[:1] == ["R"]
    return max(runnable - mine, 0)


@dataclass
class LoadMonitor:
    """The machine's load around and during a run: ``begin()`` at the start,
    ``sample()`` after every measurement, ``finish()`` at the end."""

    threads: int  # the benchmark's threads that run at once
    cores: int = 1
    start: float | None = None  # 1-minute load averages
    end: float | None = None
    samples: list[float] = field(default_factory=list)  # other runnable threads

    @classmethod
    def begin(cls, threads: int) -> "LoadMonitor":
        return cls(threads=threads, cores=cores(), start=load_average())

    def sample(self) -> None:
        others = other_runnable_threads()
        if others is not None:
            self.samples.append(others)

    def finish(self) -> None:
        self.end = load_average()

    @property
    def others_runnable(self) -> float | None:
        """The mean of the samples: threads of other work runnable during the run."""
        return statistics.fmean(self.samples) if self.samples else None

    @property
    def others(self) -> float | None:
        """Other work's load, in threads: sampled during the run where Linux tells,
        else from the load averages (the end's less the benchmark's own threads)."""
        if self.samples:
            return self.others_runnable
        figures = []
        if self.start is not None:
            figures.append(self.start)
        if self.end is not None:
            figures.append(max(self.end - self.threads, 0.0))
        return max(figures) if figures else None

    @property
    def free_cores(self) -> int:
        return max(self.cores - self.threads, 0)

    @property
    def busy(self) -> bool:
        others = self.others
        return others is not None and others > self.free_cores + BUSY_TOLERANCE

    def describe(self) -> str:
        """One line: the figures the judgement rests on."""

        def figure(value):
            return "unknown" if value is None else f"{value:.2f}"

        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        if self.samples:
            others = (
                f"other work kept {self.others_runnable:.2f} threads runnable on average "
                f"({len(self.samples)} samples)"
            )
        else:
            others = f"other work's load about {figure(self.others)}"
        return (
            f"{others} beside the benchmark's {threads} on {self.cores} cores; "
            f"load average {figure(self.start)} at the start, {figure(self.end)} at the end"
        )

    def context(self) -> dict:
        """The CSV columns of the run."""

        def rounded(value):
            return "" if value is None else round(value, 2)

        return {
            "cores": self.cores,
            "load_start": rounded(self.start),
            "load_end": rounded(self.end),
            "others_runnable": rounded(self.others_runnable),
            "busy": self.busy,
        }


@dataclass(frozen=True)
class Verdict:
    """What a run may claim: its closing lines, the first a headline."""

    reliable: bool
    lines: list[str]

    @property
    def headline(self) -> str:
        return self.lines[0]


def verdict(
    load: LoadMonitor,
    rows: int,
    noisy_rows: int,
    ratios: dict[str, int],
    noisy_copies: int = 0,
    copies: int = 0,
) -> Verdict:
    """The run's closing lines. Unreliable where the machine was busy or more than
    ``NOISY_SHARE_LIMIT`` of the rows are noisy; else the figures not marked ~ hold.
    ``ratios``: how many ratios got each judgement of ``judge_ratio``."""
    too_noisy = rows > 0 and noisy_rows > NOISY_SHARE_LIMIT * rows
    causes = []
    if load.busy:
        causes.append(
            f"busy machine, other work's load {load.others:.2f} over the "
            f"{load.free_cores} core{'s' if load.free_cores != 1 else ''} left free by "
            f"{load.threads} benchmark thread{'s' if load.threads != 1 else ''}"
        )
    if too_noisy:
        causes.append(f"{noisy_rows} of {rows} rows noisy")
    if causes:
        headline = f"UNRELIABLE: {'; '.join(causes)}. Every figure that does not hold is marked ~."
    else:
        headline = "Figures hold where not marked ~: the machine was quiet enough."
    count = {judgement: ratios.get(judgement, 0) for judgement in JUDGEMENTS}
    lines = [
        headline,
        f"  load: {load.describe()}",
        f"  rows: {noisy_rows} of {rows} noisy (20-80 percentile band over {NOISY_SPREAD:.2f} "
        f"of the median; a run with more than {NOISY_SHARE_LIMIT:.2f} of its rows noisy is "
        "unreliable)",
        f"  ratios: {count['holds']} of {sum(count.values())} hold; "
        f"{count['within spread']} within their two rows' bands (not told apart), "
        f"{count['noisy']} with a noisy row, {count['busy']} on a busy machine",
    ]
    if noisy_copies:
        lines.append(
            f"  copy: the same-run copy noisy in {noisy_copies} of {copies} cases; "
            "their fractions of copy bandwidth are marked ~"
        )
    if causes:
        lines.append(
            "  Compare providers only in a run on a quiet machine (no other jobs: other "
            f"work's load under {load.free_cores + BUSY_TOLERANCE:g})."
        )
    return Verdict(not causes, lines)
