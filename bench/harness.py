"""Timing, figure records, the group registry and the printer shared by all benchmarks.

Method (printed in the header of every run):

* every contender of a comparison is timed in the **same rounds**, in a rotating order,
  so machine noise (frequency changes, a neighbour's load) hits all of them alike;
* one round of a contender calls it ``loops`` times back to back, ``loops`` calibrated so
  a round lasts about :attr:`Settings.min_round_s` (at least one call);
* before each round ``gc.collect()`` runs, and the garbage collector is disabled while the
  round is timed (as :mod:`timeit` does), so one contender does not pay for another's
  garbage;
* before timing, a 30 MiB block is allocated and freed once, which moves glibc's dynamic
  mmap threshold (and with it the heap trim threshold) to its maximum, as in any process
  that has handled a large value before. Without it, whether a multi-MB temporary is
  served from the heap or by fresh, page-faulting ``mmap`` calls depends on what ran
  earlier in the process, and the same function's time changed by 40% with the order of
  the benchmarks;
* the reported value is the **best of N rounds** (the minimum time per call): the run least
  disturbed by the machine, the usual choice for CPU-bound code. The median of the rounds
  is kept in the JSON output next to it.

``MB`` is 10**6 bytes of UTF-8 text.
"""

from __future__ import annotations

import gc
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MB",
    "BenchError",
    "Contender",
    "Figure",
    "Group",
    "Settings",
    "Target",
    "Timing",
    "call_timed",
    "compare",
    "format_figure",
    "group",
    "machine_facts",
    "measure",
    "registered_groups",
    "settle_allocator",
]

MB = 1_000_000

Metric = Literal["rate", "mbps", "time"]


class BenchError(Exception):
    """A precondition of a benchmark failed (e.g. two implementations disagree).

    The runner stops at once and exits non-zero: a timing of code that computes something
    else is meaningless.
    """


@dataclass(frozen=True)
class Settings:
    """How hard to measure.

    A comparison runs as many rounds as fit ``budget_s`` for its slowest contender, within
    ``min_rounds``..``max_rounds``: many short rounds for fast functions (more chances of a
    round that nothing else on the machine disturbed), a few for calls that take a second.
    """

    min_rounds: int
    max_rounds: int
    budget_s: float
    min_round_s: float
    warmup_calls: int
    quick: bool

    @classmethod
    def full(cls) -> Settings:
        return cls(
            min_rounds=7, max_rounds=25, budget_s=1.0, min_round_s=0.02, warmup_calls=1, quick=False
        )

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(
            min_rounds=3, max_rounds=8, budget_s=0.06, min_round_s=0.005, warmup_calls=0, quick=True
        )

    def rounds_for(self, slowest_round_ns: float) -> int:
        fit = int(self.budget_s * 1e9 / max(slowest_round_ns, 1.0))
        return max(self.min_rounds, min(self.max_rounds, fit))

    def describe(self) -> str:
        return (
            f"best of {self.min_rounds}-{self.max_rounds} rounds (min time per call; rounds of "
            f">= {self.min_round_s * 1000:g} ms, as many as fit {self.budget_s:g} s), "
            "contenders interleaved in rotating order, gc disabled while timing, malloc "
            "thresholds settled; MB = 10^6 bytes"
        )


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Contender:
    """One implementation under test: ``fn(arg)`` is what gets timed.

    Passing the argument separately (instead of a closure) keeps the harness's own cost per
    call at one C-level loop step plus the call itself, which matters for sub-microsecond
    functions.
    """

    name: str
    fn: Callable[[Any], object]
    arg: Any = None
    #: Nanoseconds one call is known to take (e.g. from :func:`call_timed` while checking
    #: results). When that already fills a round, calibration is skipped: for calls of a
    #: second or so it would cost one more call for nothing.
    hint_ns: int | None = None


def call_timed(fn: Callable[[Any], object], arg: Any) -> tuple[Any, int]:
    """Return ``fn(arg)`` and the nanoseconds it took (for :attr:`Contender.hint_ns`)."""
    start = time.perf_counter_ns()
    result = fn(arg)
    return result, time.perf_counter_ns() - start


@dataclass(frozen=True)
class Timing:
    """Nanoseconds per call of one contender, one entry per round."""

    name: str
    loops: int
    per_call_ns: tuple[float, ...]

    @property
    def best_ns(self) -> float:
        return min(self.per_call_ns)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.per_call_ns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "loops": self.loops,
            "rounds": len(self.per_call_ns),
            "best_ns": self.best_ns,
            "median_ns": self.median_ns,
        }


def settle_allocator() -> None:
    """Put glibc's malloc into its steady state for large blocks (see the module docstring).

    Freeing an ``mmap``-served block raises the dynamic mmap threshold to that block's size
    (at most 32 MiB on 64-bit glibc) and the heap trim threshold to twice that. Other
    allocators ignore this; it costs microseconds (the pages are never touched).
    """
    block = bytes(30 * 2**20)
    del block


def _time_loop(contender: Contender, loops: int) -> int:
    """Return the nanoseconds taken by ``loops`` calls, gc collected before and off during."""
    fn = contender.fn
    arg = contender.arg
    it = itertools.repeat(None, loops)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in it:
            fn(arg)
        end = time.perf_counter_ns()
    finally:
        if enabled:
            gc.enable()
    return end - start


def _calibrate(contender: Contender, min_round_s: float) -> tuple[int, float]:
    """Return how many calls make a round of about ``min_round_s`` (also warms up), and
    the estimated duration of such a round in ns."""
    goal_ns = min_round_s * 1e9
    if contender.hint_ns is not None and contender.hint_ns >= goal_ns:
        return 1, contender.hint_ns
    loops = 1
    while True:
        elapsed = max(_time_loop(contender, loops), 1)
        if elapsed >= goal_ns / 10 or loops >= 1 << 24:
            n = max(1, math.ceil(goal_ns * loops / elapsed))
            return n, elapsed / loops * n
        loops *= 10


def measure(contenders: Sequence[Contender], settings: Settings) -> dict[str, Timing]:
    """Time all contenders in the same rounds; return their timings by name."""
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique: {names}")
    loops: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    # Objects alive now (the inputs) are moved out of the collector's sight, so the
    # gc.collect() before each round costs little even when the input is millions of objects.
    settle_allocator()
    gc.collect()
    gc.freeze()
    try:
        slowest = 0.0
        for contender in contenders:
            for _ in range(settings.warmup_calls):
                contender.fn(contender.arg)
            loops[contender.name], round_ns = _calibrate(contender, settings.min_round_s)
            slowest = max(slowest, round_ns)
        for r in range(settings.rounds_for(slowest)):
            shift = r % len(contenders)
            for contender in [*contenders[shift:], *contenders[:shift]]:
                n = loops[contender.name]
                samples[contender.name].append(_time_loop(contender, n) / n)
    finally:
        gc.unfreeze()
    return {name: Timing(name, loops[name], tuple(samples[name])) for name in names}


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Target:
    """What a figure's ratio must satisfy, e.g. ``Target(">=", 5, "acall calls/s >= 5x pynenc's")``."""

    op: Literal[">=", "<="]
    threshold: float
    description: str

    def met(self, ratio: float) -> bool:
        return ratio >= self.threshold if self.op == ">=" else ratio <= self.threshold

    @property
    def short(self) -> str:
        return f"{self.op} {self.threshold:g}x"


@dataclass(frozen=True)
class Figure:
    """One printed line: a measured value, optionally an anchor's value, ratio and target.

    ``value`` and ``anchor_value`` are in ``unit`` (already scaled, e.g. ``M/s``); the raw
    timings are in ``details``. ``ratio`` is subject / anchor of the printed values (a time
    ratio when the unit is a time). A figure without a target is information only.
    """

    group: str
    name: str
    subject: str
    value: float
    unit: str
    anchor_name: str | None = None
    anchor_value: float | None = None
    ratio: float | None = None
    target: Target | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.target.met(self.ratio)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "subject": self.subject,
            "value": self.value,
            "anchor": self.anchor_name,
            "anchor_value": self.anchor_value,
            "unit": self.unit,
            "ratio": self.ratio,
            "target": None if self.target is None else f"ratio {self.target.short}",
            "target_description": None if self.target is None else self.target.description,
            "passed": self.passed,
            "details": dict(self.details),
        }


def _scale(metric: Metric, values: Sequence[float]) -> tuple[float, str]:
    """Return the divisor and unit that print ``values`` (base units) readably."""
    top = max(values)
    if metric == "mbps":
        return MB, "MB/s"
    if metric == "rate":
        for div, unit in ((1e6, "M/s"), (1e3, "k/s")):
            if top >= div:
                return div, unit
        return 1.0, "/s"
    for div, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if top >= div:
            return div, unit
    return 1e-9, "ns"


def compare(
    group: str,
    name: str,
    timings: Mapping[str, Timing],
    subject: str,
    anchor: str | None = None,
    *,
    metric: Metric,
    nbytes: int | None = None,
    target: Target | None = None,
    subject_label: str | None = None,
) -> Figure:
    """Build a figure from two contenders' timings (or one, for a reference line).

    ``metric`` is ``"rate"`` (calls per second), ``"mbps"`` (``nbytes`` per call, in MB/s)
    or ``"time"`` (time per call). The ratio is subject / anchor of that metric, so for
    rates and MB/s higher is better for the subject and for time lower is.
    """
    if metric == "mbps" and not nbytes:
        raise ValueError("metric 'mbps' needs nbytes")

    def base(t: Timing) -> float:
        seconds = t.best_ns / 1e9
        if metric == "rate":
            return 1.0 / seconds
        if metric == "mbps":
            assert nbytes is not None
            return nbytes / seconds
        return seconds

    sub_t = timings[subject]
    anc_t = timings[anchor] if anchor is not None else None
    raw = [base(sub_t)] + ([base(anc_t)] if anc_t is not None else [])
    div, unit = _scale(metric, raw)
    details: dict[str, Any] = {subject: sub_t.as_dict()}
    if nbytes is not None:
        details["bytes_per_call"] = nbytes
    if anc_t is None:
        return Figure(
            group,
            name,
            subject_label or subject,
            raw[0] / div,
            unit,
            details=details,
        )
    assert anchor is not None
    details[anchor] = anc_t.as_dict()
    return Figure(
        group,
        name,
        subject_label or subject,
        raw[0] / div,
        unit,
        anchor_name=anchor,
        anchor_value=raw[1] / div,
        ratio=raw[0] / raw[1],
        target=target,
        details=details,
    )


def _num(value: float) -> str:
    """Three significant digits without an exponent."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


_GROUP_W = 10
_NAME_W = 32
_WHO_W = 10


def format_figure(fig: Figure) -> str:
    """One aligned line, e.g.

    ``args_id    3 small args   acall 1.23 M/s   pynenc 0.21 M/s   ratio 5.9x (target >= 5x) OK``
    """
    parts = [
        f"{fig.group:<{_GROUP_W}} {fig.name:<{_NAME_W}}",
        f"{fig.subject:>{_WHO_W}} {_num(fig.value):>7} {fig.unit:<5}",
    ]
    if fig.anchor_name is not None and fig.anchor_value is not None:
        parts.append(f"{fig.anchor_name:>{_WHO_W}} {_num(fig.anchor_value):>7} {fig.unit:<5}")
    else:
        parts.append(" " * (_WHO_W + 14))
    if fig.ratio is not None:
        parts.append(f"ratio {_num(fig.ratio):>5}x")
        if fig.target is not None:
            parts.append(f"(target {fig.target.short}) {'OK' if fig.passed else 'MISSED'}")
        else:
            parts.append("(info)")
    else:
        parts.append("(reference)")
    return "  ".join(parts).rstrip()


# --------------------------------------------------------------------------- registry

GroupFn = Callable[[Settings], Iterator[Figure]]


@dataclass(frozen=True)
class Group:
    """A named set of figures, produced by one generator function."""

    name: str
    description: str
    fn: GroupFn


_REGISTRY: list[Group] = []


def group(name: str, description: str) -> Callable[[GroupFn], GroupFn]:
    """Register a figure group: a generator ``fn(settings)`` yielding :class:`Figure`."""

    def register(fn: GroupFn) -> GroupFn:
        if any(g.name == name for g in _REGISTRY):
            raise ValueError(f"benchmark group {name!r} registered twice")
        _REGISTRY.append(Group(name, description, fn))
        return fn

    return register


def registered_groups() -> list[Group]:
    return list(_REGISTRY)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _acall_checkout() -> str:
    """``0.1.0 (git abc1234, uncommitted changes)`` for the acall being measured."""
    version = _version("acall")
    try:
        import acall
    except ImportError:
        return version
    root = Path(acall.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "acall"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{version} ({root})"
    return f"{version} (git {head}{', acall/ modified' if dirty else ''}, {root})"


def machine_facts() -> dict[str, str]:
    """CPU, cores, Python and the versions of acall and the anchors."""
    cores = str(os.cpu_count() or "?")
    if hasattr(os, "sched_getaffinity"):
        cores += f" ({len(os.sched_getaffinity(0))} usable)"
    facts = {
        "cpu": _cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "acall": _acall_checkout(),
        "pynenc": _version("pynenc"),
        "rustvello": _version("rustvello"),
        "pynenc-rustvello": _version("pynenc-rustvello"),
    }
    if hasattr(os, "getloadavg"):
        # Other work on the machine shows up here; near 0 is what the figures assume.
        facts["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    facts["python speed"] = python_speed()
    return facts


def python_speed(rounds: int = 5, n: int = 2_000_000) -> str:
    """How fast this machine runs plain Python now: the best of *rounds* timings of a
    fixed loop, as ns per iteration.

    The absolute figures (tasks/s) depend on it, the ratios to the anchors much less:
    runs on different days, or machines, compare through this line.
    """
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - start)
    return f"{best / n * 1e9:.1f} ns per iteration of a plain loop (best of {rounds})"
