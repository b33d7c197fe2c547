"""Soak: many invocations through the Redis backend, every result checked, memory watched.

::

    python -m bench.soak                                  # 100,000 invocations, 4 workers
    python -m bench.soak --invocations 5000 --workers 2 --submitters 200
    python -m bench.soak --redis redis://127.0.0.1:6379/0 --json soak.json

What it does:

1. starts a throw-away ``redis-server`` (:class:`acall.testing.RedisServer`), unless
   ``--redis URL`` names one; the run's keys have a prefix of their own
   (``soak-<run id>:``), deleted at the end from a ``--redis`` server unless ``--keep``;
2. starts ``--workers`` worker processes, ``python -m acall worker
   bench._soak_tasks:app --broker URL --store URL --concurrency N``, and waits until
   each one has run a warm-up task. Each worker sweeps unneeded blobs every
   ``--sweep-interval`` seconds (30, so that sweeps run under the load; acall's default
   is 600) with acall's grace period unless ``--sweep-grace`` shortens it;
3. in this process (the client), ``--submitters`` coroutines share ``--invocations``
   invocations: each takes the next unit of work from one deterministic plan, submits
   it (``task.submit``, or ``submit_many`` for a batch of 10), awaits its results and
   checks every one against the value computed here. The plan mixes the tasks of
   ``bench/_soak_tasks.py``: async no-ops, small CPU work in a thread, unique and shared
   arguments large enough to be offloaded, offloaded results, structured values, calls
   that fail once and succeed on the retry (their record must show attempt 2) and calls
   that always fail (the client must get their ``ValueError`` back);
4. prints a progress line every few seconds (done/total, rate, RSS of the client and
   of each worker), then the figures: total, wall time, throughput, errors, lost, peak
   RSS (``VmHWM`` of ``/proc/PID/status``) of the client and of each worker, the
   broker's counts, what is left in the queue structures, the store's keys and bytes,
   and the sweeps the workers made.

It fails (exit status 1) when anything is wrong: a wrong result or exception, an
invocation whose result never came (*lost*), broker counts that do not add up, queue
entries left behind, more store keys than distinct offloaded values, a worker that
exited or logged an unexpected warning or error, an acall warning in the client, or a
peak RSS above ``--max-client-rss`` / ``--max-worker-rss`` (MiB) when given. Exit
status 2: the soak could not run (no ``redis-server``, a worker that never started).

Only acall, redis-py and the standard library are used (no benchmark anchors), so it
runs in the test venv as well as in ``bench/.venv``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio

from bench._procs import Service

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from acall import InvocationHandle

__all__ = ["SoakSettings", "main", "run_soak"]

BATCH: Final = 10
QUEUE: Final = "default"
KiB: Final = 1024

#: Units of work of the plan and their relative weights (a unit is one ``submit``, or
#: one ``submit_many`` of BATCH invocations for the ``batch-*`` kinds).
WEIGHTS: Final = {
    "add": 40,
    "digest": 14,
    "summary": 10,
    "fold": 10,
    "fold-shared": 5,
    "wide": 5,
    "flaky": 2,
    "reject": 1,
    "batch-add": 2,
    "batch-fold": 1,
}
#: Distinct large texts shared by the ``fold-shared`` and ``batch-fold`` units.
SHARED_TEXTS: Final = 64
SHARED_SEED: Final = 10**9

#: Worker log lines that are part of the plan (flaky retries, rejected calls).
_EXPECTED_WARNINGS: Final = (
    re.compile(r"attempt 1 failed \(bench\._soak_tasks\.SoakFlakyError: attempt 1 of flaky"),
    re.compile(r"failed on attempt 1: ValueError: rejected \d+"),
)
_LOG_LEVEL: Final = re.compile(r" (WARNING|ERROR|CRITICAL) ")
_SWEEP: Final = re.compile(
    r"blob sweep: (?P<records>\d+) records .*; deleted (?P<blobs>\d+) blobs and "
    r"(?P<chunks>\d+) chunks, kept (?P<kept>\d+) recently used, in (?P<seconds>[0-9.]+) s"
    r"(?:; deletion skipped: (?P<skipped>.*))?"
)


class SetupError(RuntimeError):
    """The soak could not run (exit status 2)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SoakSettings:
    invocations: int = 100_000
    workers: int = 4
    submitters: int = 1_000
    concurrency: int = 64
    redis: str | None = None
    seed: int = 1
    progress_every: float = 5.0
    result_timeout: float = 300.0
    timeout: float = 3600.0
    max_client_rss: float | None = None
    max_worker_rss: float | None = None
    sweep_interval: float = 30.0
    sweep_grace: float | None = None
    keep: bool = False
    json_path: Path | None = None

    @classmethod
    def from_args(cls, argv: Sequence[str] | None) -> SoakSettings:
        parser = argparse.ArgumentParser(
            prog="python -m bench.soak",
            description="Soak acall on Redis: many invocations, every result checked, "
            "peak RSS of the client and each worker.",
        )
        add = parser.add_argument
        add("--invocations", type=int, default=cls.invocations, help="total (default 100000)")
        add("--workers", type=int, default=cls.workers, help="worker processes (default 4)")
        add("--submitters", type=int, default=cls.submitters, help="client coroutines (1000)")
        add("--concurrency", type=int, default=cls.concurrency, help="per worker (default 64)")
        add("--redis", metavar="URL", help="use this Redis instead of starting redis-server")
        add("--seed", type=int, default=cls.seed, help="seed of the work plan (default 1)")
        add("--progress-every", type=float, default=cls.progress_every, metavar="SECONDS")
        add("--result-timeout", type=float, default=cls.result_timeout, metavar="SECONDS")
        add("--timeout", type=float, default=cls.timeout, metavar="SECONDS", help="whole run")
        add("--max-client-rss", type=float, metavar="MIB", help="fail above this peak RSS")
        add("--max-worker-rss", type=float, metavar="MIB", help="fail above this peak RSS")
        add(
            "--sweep-interval",
            type=float,
            default=cls.sweep_interval,
            metavar="SECONDS",
            help="seconds between two blob sweeps of each worker (default 30)",
        )
        add(
            "--sweep-grace",
            type=float,
            metavar="SECONDS",
            help="idle time before an unneeded blob is deleted (default: acall's, 1 hour)",
        )
        add("--keep", action="store_true", help="keep the run's keys on a --redis server")
        add("--json", dest="json_path", type=Path, metavar="PATH", help="write the figures")
        ns = parser.parse_args(argv)
        for name in ("invocations", "workers", "submitters", "concurrency"):
            if getattr(ns, name) < 1:
                parser.error(f"--{name} must be >= 1")
        return cls(**vars(ns))


# --------------------------------------------------------------------------- memory


def _status_field(pid: int | str, field_name: str) -> int:
    """A numeric field of ``/proc/PID/status`` (``Vm*`` ones are in KiB); 0 when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int | str = "self") -> int:
    """Current resident set size (``VmRSS``)."""
    return _status_field(pid, "VmRSS")


def peak_rss_kib(pid: int | str = "self") -> int:
    """Peak resident set size so far (``VmHWM``)."""
    return _status_field(pid, "VmHWM")


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU time of a process so far (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int | str = "self") -> int:
    """How many threads the process has."""
    return _status_field(pid, "Threads")


def _mib(kib: float) -> float:
    return round(kib / KiB, 1)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Raises:
    """The expected outcome of a call that fails: this exception type and message."""

    type: type[BaseException]
    message: str


@dataclass
class Unit:
    """One submission (one call, or one ``submit_many``) and what each invocation returns."""

    kind: str
    submit: Callable[[], Awaitable[list[InvocationHandle[Any]]]]
    expected: list[Any]
    #: The attempt number every invocation of the unit must finish on (None: any).
    attempts: int | None = None


@dataclass
class PlanStats:
    """What the plan handed out: invocations, and the distinct values it offloaded."""

    invocations: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    #: Unique large texts (one per ``fold`` unit): counted, not kept, so the client's
    #: own bookkeeping does not grow with the run.
    unique_texts: int = 0
    #: Which of the SHARED_TEXTS shared texts were used (a bounded set).
    shared_seeds: set[int] = field(default_factory=set)
    wide_results: int = 0

    @property
    def offloaded_values(self) -> int:
        """Distinct values large enough to be offloaded: arguments and results."""
        return self.unique_texts + len(self.shared_seeds) + self.wide_results


def plan(total: int, seed: int, stats: PlanStats) -> Iterator[Unit]:
    """The soak's units of work, *total* invocations in all, deterministic for *seed*.

    Lazy: nothing is built before a submitter asks for it, so a long run holds only
    the units in flight.
    """
    from bench import _soak_tasks as t

    rng = random.Random(seed)
    kinds = list(WEIGHTS)
    weights = list(WEIGHTS.values())
    i = 0
    while i < total:
        kind = rng.choices(kinds, weights)[0]
        n = min(BATCH, total - i) if kind.startswith("batch-") else 1
        unit = _unit(t, kind, i, n, rng, stats)
        stats.invocations += n
        stats.by_kind[kind] += n
        i += n
        yield unit


def _unit(t: Any, kind: str, i: int, n: int, rng: random.Random, stats: PlanStats) -> Unit:
    if kind == "add":
        a, b = rng.randrange(10**6), rng.randrange(10**6)
        return Unit(kind, lambda: _one(t.add.submit(a, b)), [t.expected_add(a, b)])
    if kind == "digest":
        return Unit(
            kind,
            lambda: _one(t.digest.submit(i, t.DIGEST_ROUNDS)),
            [t.expected_digest(i, t.DIGEST_ROUNDS)],
        )
    if kind == "summary":
        tags = [f"tag{rng.randrange(100)}" for _ in range(rng.randrange(1, 6))]
        weights = {f"w{k}": rng.randrange(1000) / 8 for k in range(rng.randrange(1, 6))}
        return Unit(
            kind,
            lambda: _one(t.summary.submit(i, tags, weights)),
            [t.expected_summary(i, tags, weights)],
        )
    if kind == "fold":
        stats.unique_texts += 1
        text = t.large_text(i)  # seeds below SHARED_SEED: never equal to a shared text
        return Unit(kind, lambda: _one(t.fold.submit(i, text)), [t.expected_fold(i, text)])
    if kind == "fold-shared":
        text_seed = SHARED_SEED + rng.randrange(SHARED_TEXTS)
        stats.shared_seeds.add(text_seed)
        text = t.large_text(text_seed)
        return Unit(kind, lambda: _one(t.fold.submit(i, text)), [t.expected_fold(i, text)])
    if kind == "wide":
        stats.wide_results += 1
        return Unit(kind, lambda: _one(t.wide_result.submit(i)), [t.expected_wide(i)])
    if kind == "flaky":
        return Unit(kind, lambda: _one(t.flaky.submit(i)), [t.expected_flaky(i)], attempts=2)
    if kind == "reject":
        stats.rejects += 1
        return Unit(kind, lambda: _one(t.reject.submit(i)), [Raises(ValueError, f"rejected {i}")])
    if kind == "batch-add":
        pairs = [(rng.randrange(10**6), rng.randrange(10**6)) for _ in range(n)]
        return Unit(
            kind,
            lambda: t.add.submit_many([{"a": a, "b": b} for a, b in pairs]),
            [t.expected_add(a, b) for a, b in pairs],
        )
    if kind == "batch-fold":
        text_seed = SHARED_SEED + rng.randrange(SHARED_TEXTS)
        stats.shared_seeds.add(text_seed)
        text = t.large_text(text_seed)
        ids = range(i, i + n)
        return Unit(
            kind,
            lambda: t.fold.submit_many([{"i": k} for k in ids], common_args={"text": text}),
            [t.expected_fold(k, text) for k in ids],
        )
    raise AssertionError(kind)


async def _one(submission: Awaitable[InvocationHandle[Any]]) -> list[InvocationHandle[Any]]:
    return [await submission]


# --------------------------------------------------------------------------- the client


@dataclass
class Tally:
    """What the client saw, updated as results come in."""

    total: int
    submitted: int = 0
    done: int = 0
    ok: int = 0
    errors: int = 0
    lost: int = 0
    ok_by_kind: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def error(self, message: str, count: int = 1) -> None:
        self.errors += count
        self.done += count
        self._note(message)

    def lose(self, message: str) -> None:
        self.lost += 1
        self.done += 1
        self._note(message)

    def _note(self, message: str) -> None:
        if len(self.messages) < 20:
            self.messages.append(message)


@dataclass
class Sample:
    """One progress line's figures."""

    seconds: float
    done: int
    client_rss_kib: int
    worker_rss_kib: list[int]
    worker_threads: list[int]

    @classmethod
    def take(cls, seconds: float, done: int, workers: Sequence[Service]) -> Sample:
        return cls(
            seconds,
            done,
            rss_kib(),
            [rss_kib(w.pid) for w in workers],
            [threads(w.pid) for w in workers],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "done": self.done,
            "client_rss_mib": _mib(self.client_rss_kib),
            "worker_rss_mib": [_mib(k) for k in self.worker_rss_kib],
            "worker_threads": self.worker_threads,
        }


class WorkerDied(RuntimeError):
    """A worker process exited during the run."""


class _LogProblems(logging.Handler):
    """Counts the client's own acall warnings and errors (a healthy run has none)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:500])


async def _check(
    tally: Tally,
    kind: str,
    handle: InvocationHandle[Any],
    expected: Any,
    attempts: int | None,
    result_timeout: float,
) -> None:
    from acall import ResultTimeoutError

    where = f"{kind} {handle.invocation_id}"
    try:
        value = await handle.result(timeout=result_timeout)
    except ResultTimeoutError:
        tally.lose(f"{where}: no result within {result_timeout:g} s (lost)")
        return
    except Exception as exc:
        if (
            isinstance(expected, Raises)
            and type(exc) is expected.type
            and str(exc) == expected.message
        ):
            tally.ok += 1
            tally.ok_by_kind[kind] += 1
            tally.done += 1
        else:
            tally.error(f"{where}: raised {exc!r}, expected {expected!r:.200}")
        return
    if isinstance(expected, Raises) or value != expected:
        tally.error(f"{where}: returned {value!r:.200}, expected {expected!r:.200}")
        return
    if attempts is not None:
        try:
            record = await handle.record()
        except Exception as exc:
            tally.error(f"{where}: reading its record failed: {exc!r}")
            return
        if record.attempt != attempts:
            tally.error(f"{where}: finished on attempt {record.attempt}, expected {attempts}")
            return
    tally.ok += 1
    tally.ok_by_kind[kind] += 1
    tally.done += 1


async def _submitter(units: Iterator[Unit], tally: Tally, result_timeout: float) -> None:
    # Every submitter draws from the same iterator: the plan is shared, in order.
    for unit in units:
        n = len(unit.expected)
        try:
            handles = await unit.submit()
        except Exception as exc:
            tally.error(f"{unit.kind}: submitting {n} invocation(s) failed: {exc!r}", n)
            continue
        tally.submitted += n
        if len(handles) != n:
            tally.error(f"{unit.kind}: {len(handles)} handles for {n} submissions", n)
            continue
        if n == 1:
            await _check(
                tally, unit.kind, handles[0], unit.expected[0], unit.attempts, result_timeout
            )
        else:
            await asyncio.gather(
                *(
                    _check(tally, unit.kind, h, e, unit.attempts, result_timeout)
                    for h, e in zip(handles, unit.expected, strict=True)
                )
            )


def _progress_line(
    settings: SoakSettings, tally: Tally, elapsed: float, recent_rate: float | None, sample: Sample
) -> str:
    rate = tally.done / elapsed if elapsed > 0 else 0.0
    recent = "end" if recent_rate is None else f"last {recent_rate:7,.0f}/s"
    workers = "/".join(f"{_mib(k):.0f}" for k in sample.worker_rss_kib)
    return (
        f"soak: {elapsed:7.1f} s  {tally.done:>9,}/{settings.invocations:,} done  "
        f"{rate:7,.0f}/s ({recent})  in flight {tally.submitted - tally.done:>6,}  "
        f"errors {tally.errors}  lost {tally.lost}  RSS MiB client {_mib(sample.client_rss_kib):.0f}, "
        f"workers {workers} (threads {'/'.join(str(n) for n in sample.worker_threads)})"
    )


async def _monitor(
    settings: SoakSettings,
    tally: Tally,
    workers: Sequence[Service],
    started: float,
    samples: list[Sample],
) -> None:
    """Print a progress line every ``progress_every`` seconds; fail if a worker exits."""
    last_t, last_done = started, 0
    next_line = started + settings.progress_every
    while True:
        await anyio.sleep(min(0.25, settings.progress_every))
        for worker in workers:
            message = worker.exited()
            if message is not None:
                raise WorkerDied(message)
        now = time.perf_counter()
        if now < next_line:
            continue
        next_line = now + settings.progress_every
        sample = Sample.take(now - started, tally.done, workers)
        samples.append(sample)
        recent = (tally.done - last_done) / max(1e-9, now - last_t)
        last_t, last_done = now, tally.done
        print(_progress_line(settings, tally, now - started, recent, sample), flush=True)


async def _warm_up(settings: SoakSettings, workers: Sequence[Service]) -> int:
    """Run ``whoami`` tasks until every worker process has run one; return how many ran."""
    from bench._soak_tasks import whoami

    expected = {w.pid for w in workers}
    seen: set[int] = set()
    ran = 0
    with anyio.move_on_after(120):
        while seen != expected:
            for worker in workers:
                message = worker.exited()
                if message is not None:
                    raise SetupError(message)
            handles = await whoami.submit_many(
                [{"pause": 0.2}] * (settings.workers * settings.concurrency)
            )
            pids = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            ran += len(handles)
            stray = set(pids) - expected
            if stray:
                raise SetupError(f"warm-up tasks ran in unknown processes {sorted(stray)}")
            seen.update(pids)
    if seen != expected:
        missing = [w for w in workers if w.pid not in seen]
        raise SetupError(
            f"{len(missing)} worker(s) ran no warm-up task within 120 s; end of the log of "
            f"{missing[0].name}:\n{missing[0].log_tail()}"
        )
    return ran


# --------------------------------------------------------------------------- end state


async def _count_keys(client: Redis, pattern: str, *, sizes: bool = False) -> tuple[int, int]:
    """How many keys match *pattern*, and (with *sizes*) their values' total length."""
    count = total = 0
    batch: list[Any] = []

    async def flush() -> None:
        nonlocal total
        if sizes and batch:
            async with client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.strlen(key)
                total += sum(int(n) for n in await pipe.execute())
        batch.clear()

    async for key in client.scan_iter(match=pattern, count=1000):
        count += 1
        batch.append(key)
        if len(batch) >= 1000:
            await flush()
    await flush()
    return count, total


async def _end_state(
    app: Any, client: Redis, broker_prefix: str, store_prefix: str
) -> dict[str, Any]:
    from acall.hashing import REFERENCE_PREFIX

    counts = await app.broker.counts()
    pending = await app.broker.pending_count(QUEUE)
    stream = f"{broker_prefix}q:{QUEUE}"
    stream_len = int(await client.xlen(stream)) if await client.exists(stream) else 0
    group_pending = 0
    if stream_len or await client.exists(stream):
        summary = await client.xpending(stream, "acall-workers")
        group_pending = int(summary["pending"])
    # Offloaded values only: the store also keeps small bookkeeping keys (the time of
    # the last blob sweep).
    store_keys, store_bytes = await _count_keys(
        client, f"{store_prefix}{REFERENCE_PREFIX}*", sizes=True
    )
    records, _ = await _count_keys(client, f"{broker_prefix}inv:*")
    dedup, _ = await _count_keys(client, f"{broker_prefix}dedup:*")
    memory = await client.info("memory")
    return {
        "broker_counts": {status.value: n for status, n in sorted(counts.items())},
        "queue": {
            "pending_count": pending,
            "stream_entries": stream_len,
            "group_pending": group_pending,
            "inflight": int(await client.zcard(f"{broker_prefix}inflight:{QUEUE}")),
            "delayed": int(await client.zcard(f"{broker_prefix}delayed:{QUEUE}")),
            "dedup_keys": dedup,
        },
        "records": records,
        "store": {"keys": store_keys, "bytes": store_bytes},
        "redis": {
            "dbsize": int(await client.dbsize()),
            "used_memory_mib": _mib(int(memory["used_memory"]) / KiB),
            "used_memory_peak_mib": _mib(int(memory["used_memory_peak"]) / KiB),
            "used_memory_rss_mib": _mib(int(memory["used_memory_rss"]) / KiB),
        },
    }


def _worker_log_problems(workers: Sequence[Service]) -> list[str]:
    """Warning and error lines of the workers' logs that the plan does not explain."""
    problems: list[str] = []
    for worker in workers:
        try:
            text = worker.log_path.read_text(errors="replace")
        except OSError as exc:
            problems.append(f"{worker.name}: cannot read its log: {exc}")
            continue
        for line in text.splitlines():
            unexpected = "Traceback" in line or (
                _LOG_LEVEL.search(line) is not None
                and not any(p.search(line) for p in _EXPECTED_WARNINGS)
            )
            if unexpected:
                problems.append(f"{worker.name}: {line[:300]}")
    return problems


def _sweeps(workers: Sequence[Service]) -> dict[str, Any]:
    """The blob sweeps the workers logged: how many, what they deleted, the slowest."""
    found = [m for w in workers for m in _SWEEP.finditer(_log_text(w))]
    return {
        "count": len(found),
        "deleted_blobs": sum(int(m["blobs"]) for m in found),
        "deleted_chunks": sum(int(m["chunks"]) for m in found),
        "kept_recent": max((int(m["kept"]) for m in found), default=0),
        "most_records": max((int(m["records"]) for m in found), default=0),
        "longest_s": max((float(m["seconds"]) for m in found), default=0.0),
        "skipped": sorted({m["skipped"] for m in found if m["skipped"]}),
    }


def _log_text(worker: Service) -> str:
    try:
        return worker.log_path.read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- the run


def _with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def _percentile_samples(samples: Sequence[Sample], total: int) -> list[Sample]:
    """The samples closest to 25, 50, 75 and 100 % done."""
    if not samples:
        return []
    chosen: list[Sample] = []
    for q in (1, 2, 3, 4):
        nearest = min(samples, key=lambda s: abs(s.done - total * q / 4))
        if nearest not in chosen:
            chosen.append(nearest)
    return chosen


def _inspector(redis_url: str) -> Redis:
    """A plain redis-py client for the soak's own look at the keys (not acall's: what is
    counted must not depend on the code under test). Dropped connections are retried."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    return Redis.from_url(
        redis_url,
        decode_responses=True,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 10),
        retry_on_error=[ConnectionError, TimeoutError],
    )


async def _client(
    settings: SoakSettings,
    broker_url: str,
    store_url: str,
    redis_url: str,
    broker_prefix: str,
    store_prefix: str,
    workers: Sequence[Service],
) -> dict[str, Any]:
    from bench._soak_tasks import app, blob_collection

    # The same collection settings as the workers': they set the codec's reuse window.
    app.blob_collection = blob_collection(settings.sweep_interval, settings.sweep_grace)
    app.configure(broker=broker_url, store=store_url)
    client = _inspector(redis_url)
    stats = PlanStats()
    tally = Tally(settings.invocations)
    samples: list[Sample] = []
    problems = _LogProblems()
    acall_logger = logging.getLogger("acall")
    acall_logger.addHandler(problems)
    report: dict[str, Any] = {}
    try:
        async with app:
            warm_up = await _warm_up(settings, workers)
            print(
                f"soak: {settings.workers} workers ready ({warm_up} warm-up tasks); "
                f"{settings.submitters:,} submitters start {settings.invocations:,} invocations",
                flush=True,
            )
            units = plan(settings.invocations, settings.seed, stats)
            cpu_before = await _cpu(client, workers)
            started = time.perf_counter()
            died: str | None = None
            timed_out = False
            try:
                with anyio.move_on_after(settings.timeout) as deadline:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_monitor, settings, tally, workers, started, samples)
                        async with anyio.create_task_group() as subs:
                            for _ in range(settings.submitters):
                                subs.start_soon(_submitter, units, tally, settings.result_timeout)
                        tg.cancel_scope.cancel()
                timed_out = deadline.cancelled_caught
            except* WorkerDied as group:
                died = str(group.exceptions[0])
            elapsed = time.perf_counter() - started
            cpu_after = await _cpu(client, workers)
            report["cpu_s"] = {
                name: [
                    None if a is None or b is None else round(b - a, 1)
                    for a, b in zip(cpu_before[name], after, strict=True)
                ]
                for name, after in cpu_after.items()
            }
            now = time.perf_counter()
            samples.append(Sample.take(now - started, tally.done, workers))
            print(_progress_line(settings, tally, elapsed, None, samples[-1]), flush=True)
            report["warm_up_invocations"] = warm_up
            report["elapsed_s"] = elapsed
            report["died"] = died
            report["timed_out"] = timed_out
            if died is None:
                # Let the workers settle (finished invocations are already acknowledged).
                await anyio.sleep(0.5)
            report["end"] = await _end_state(app, client, broker_prefix, store_prefix)
            report["client_codec"] = dict(app.codec.stats)
    finally:
        acall_logger.removeHandler(problems)
        await client.aclose()
    report["tally"] = tally
    report["plan"] = stats
    report["samples"] = samples
    report["client_log_problems"] = problems.lines
    return report


async def _cpu(client: Redis, workers: Sequence[Service]) -> dict[str, list[float | None]]:
    """CPU seconds used so far by this process, each worker and the Redis server."""
    info = await client.info("cpu")
    return {
        "client": [cpu_seconds()],
        "workers": [cpu_seconds(w.pid) for w in workers],
        "redis": [float(info["used_cpu_user"]) + float(info["used_cpu_sys"])],
    }


async def _delete_keys(redis_url: str, pattern: str) -> int:
    client = _inspector(redis_url)
    deleted = 0
    try:
        batch: list[str] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(await client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await client.unlink(*batch))
    finally:
        await client.aclose()
    return deleted


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    """Run the soak and return its figures, with ``"ok"`` and ``"failures"``."""
    from acall.testing import RedisServer

    run_id = uuid.uuid4().hex[:8]
    prefix = f"soak-{run_id}:"
    broker_prefix, store_prefix = f"{prefix}b:", f"{prefix}d:"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="acall-soak-")))
        if settings.redis is None:
            if RedisServer.find_executable() is None:
                raise SetupError("redis-server is not on PATH; install Redis or pass --redis URL")
            server = stack.enter_context(RedisServer(databases=2))
            redis_url = server.url_for(0)
        else:
            redis_url = settings.redis
        broker_url = _with_prefix(redis_url, broker_prefix)
        store_url = _with_prefix(redis_url, store_prefix)
        print(
            f"soak: {settings.invocations:,} invocations, {settings.workers} workers "
            f"(concurrency {settings.concurrency}), {settings.submitters:,} submitters, "
            f"Redis {redis_url.split('@')[-1]} (prefix {prefix})",
            flush=True,
        )
        from bench._soak_tasks import SWEEP_GRACE_ENV, SWEEP_INTERVAL_ENV

        worker_env = {SWEEP_INTERVAL_ENV: repr(settings.sweep_interval)}
        if settings.sweep_grace is not None:
            worker_env[SWEEP_GRACE_ENV] = repr(settings.sweep_grace)
        worker_args = [
            "--log-level", "WARNING", "worker", "bench._soak_tasks:app",
            "--broker", broker_url, "--store", store_url,
            "--concurrency", str(settings.concurrency), "--grace-period", "10",
        ]  # fmt: skip
        workers = [
            stack.enter_context(
                Service(f"soak-worker-{k}", "acall", worker_args, log_dir=tmp, env=worker_env)
            )
            for k in range(settings.workers)
        ]
        try:
            report = anyio.run(
                _client,
                settings,
                broker_url,
                store_url,
                redis_url,
                broker_prefix,
                store_prefix,
                workers,
            )
            # VmHWM while they still run; then a graceful stop must end them with status 0.
            worker_peaks = [peak_rss_kib(w.pid) for w in workers]
            exits: list[int | None] = []
            for worker in workers:
                worker.stop()
                exits.append(None if worker.proc is None else worker.proc.returncode)
            report["worker_log_problems"] = _worker_log_problems(workers)
            report["sweeps"] = _sweeps(workers)
        finally:
            if settings.redis is not None and not settings.keep:
                anyio.run(_delete_keys, redis_url, f"{prefix}*")
    report["settings"] = settings
    report["load_average"] = os.getloadavg()
    report["client_peak_rss_kib"] = peak_rss_kib()
    report["worker_peak_rss_kib"] = worker_peaks
    report["worker_exit_status"] = exits
    return _judge(report)


def _judge(report: dict[str, Any]) -> dict[str, Any]:
    """Turn the raw report into figures, and list everything that is wrong."""
    settings: SoakSettings = report["settings"]
    tally: Tally = report["tally"]
    stats: PlanStats = report["plan"]
    end: dict[str, Any] = report["end"]
    failures: list[str] = []
    total = settings.invocations
    counts: dict[str, int] = end["broker_counts"]
    expected_failed = stats.rejects
    expected_success = stats.invocations - stats.rejects + report["warm_up_invocations"]
    finished = counts.get("success", 0) + counts.get("failed", 0)
    shortfall = max(0, expected_success + expected_failed - finished)
    lost = max(tally.lost, shortfall)

    if report["died"]:
        failures.append(f"a worker exited during the run: {report['died']}")
    if report["timed_out"]:
        failures.append(f"the run did not finish within {settings.timeout:g} s")
    if stats.invocations != total or tally.done != total:
        failures.append(f"{tally.done:,} of {total:,} invocations were checked")
    if tally.errors:
        failures.append(f"{tally.errors} errors; first: " + " | ".join(tally.messages[:5]))
    if lost:
        failures.append(f"{lost} invocations lost")
    if counts.get("success", 0) != expected_success or counts.get("failed", 0) != expected_failed:
        failures.append(
            f"broker counts {counts} (expected success {expected_success:,}, "
            f"failed {expected_failed:,})"
        )
    leftovers = {k: v for k, v in end["queue"].items() if v}
    if leftovers:
        failures.append(f"queue structures not empty at the end: {leftovers}")
    if end["store"]["keys"] > stats.offloaded_values:
        failures.append(
            f"{end['store']['keys']:,} store keys for {stats.offloaded_values:,} distinct "
            "offloaded values"
        )
    bad_exits = [s for s in report["worker_exit_status"] if s != 0]
    if bad_exits:
        failures.append(f"workers exited with status {report['worker_exit_status']} on SIGTERM")
    for name in ("worker_log_problems", "client_log_problems"):
        lines: list[str] = report[name]
        if lines:
            failures.append(f"{len(lines)} {name.replace('_', ' ')}; first: {lines[0]}")
    client_peak = _mib(report["client_peak_rss_kib"])
    worker_peaks = [_mib(k) for k in report["worker_peak_rss_kib"]]
    if settings.max_client_rss is not None and client_peak > settings.max_client_rss:
        failures.append(f"client peak RSS {client_peak} MiB > {settings.max_client_rss:g} MiB")
    if settings.max_worker_rss is not None and max(worker_peaks) > settings.max_worker_rss:
        failures.append(f"worker peak RSS {worker_peaks} MiB > {settings.max_worker_rss:g} MiB")

    elapsed = report["elapsed_s"]
    samples: list[Sample] = report["samples"]
    return {
        "ok": not failures,
        "failures": failures,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(settings).items()
            if k != "redis" or v is None
        },
        "invocations": total,
        "checked": tally.done,
        "correct": tally.ok,
        "errors": tally.errors,
        "lost": lost,
        "error_messages": tally.messages,
        "wall_s": round(elapsed, 2),
        "throughput_per_s": round(tally.done / elapsed, 1) if elapsed > 0 else 0.0,
        "by_kind": dict(sorted(stats.by_kind.items())),
        "correct_by_kind": dict(sorted(tally.ok_by_kind.items())),
        "warm_up_invocations": report["warm_up_invocations"],
        "cpu_s": report["cpu_s"],
        "load_average": report["load_average"],
        "client_peak_rss_mib": client_peak,
        "worker_peak_rss_mib": worker_peaks,
        "rss_at_quarters": [s.as_dict() for s in _percentile_samples(samples, total)],
        "samples": [s.as_dict() for s in samples],
        "offloaded_values": stats.offloaded_values,
        "client_codec": report["client_codec"],
        **end,
        "worker_exit_status": report["worker_exit_status"],
        "sweeps": report["sweeps"],
        "worker_log_problems": report["worker_log_problems"][:20],
        "client_log_problems": report["client_log_problems"][:20],
    }


def _print_summary(figures: dict[str, Any]) -> None:
    p = print
    p("soak: summary")
    p(f"  invocations        {figures['invocations']:,} ({figures['warm_up_invocations']} warm-up "
      "tasks not counted)")  # fmt: skip
    p("  by kind            " + ", ".join(f"{k} {v:,}" for k, v in figures["by_kind"].items()))
    p(f"  wall time          {figures['wall_s']:.1f} s (first submission to last result)")
    p(f"  throughput         {figures['throughput_per_s']:,.0f} invocations/s")
    p(f"  correct            {figures['correct']:,} of {figures['checked']:,} checked")
    p(f"  errors             {figures['errors']}")
    p(f"  lost               {figures['lost']}")
    cpu = figures["cpu_s"]
    p(f"  CPU seconds        client {cpu['client'][0]}, workers "
      + "/".join(str(c) for c in cpu["workers"]) + f", redis-server {cpu['redis'][0]} "
      "(load average at the end: " + " ".join(f"{x:.2f}" for x in figures["load_average"]) + ")")  # fmt: skip
    p(f"  peak RSS client    {figures['client_peak_rss_mib']:.1f} MiB")
    p(
        "  peak RSS workers   "
        + ", ".join(f"{m:.1f}" for m in figures["worker_peak_rss_mib"])
        + " MiB"
    )
    quarters = figures["rss_at_quarters"]
    if quarters:
        p("  RSS while running  " + "; ".join(
            f"{q['done']:,} done: client {q['client_rss_mib']:.0f}, workers "
            + "/".join(f"{w:.0f}" for w in q["worker_rss_mib"])
            for q in quarters
        ) + " MiB")  # fmt: skip
    p(
        "  broker counts      "
        + ", ".join(f"{k} {v:,}" for k, v in figures["broker_counts"].items())
    )
    p("  queue at the end   " + ", ".join(f"{k} {v}" for k, v in figures["queue"].items()))
    p(f"  records            {figures['records']:,} invocation records (kept for the record TTL)")
    p(f"  store              {figures['store']['keys']:,} keys, {figures['store']['bytes']:,} bytes "
      f"({figures['offloaded_values']:,} distinct offloaded values)")  # fmt: skip
    r = figures["redis"]
    p(f"  redis              {r['dbsize']:,} keys, used memory {r['used_memory_mib']} MiB "
      f"(peak {r['used_memory_peak_mib']} MiB, RSS {r['used_memory_rss_mib']} MiB)")  # fmt: skip
    sw = figures["sweeps"]
    p(f"  blob sweeps        {sw['count']} by the workers: deleted {sw['deleted_blobs']:,} blobs, "
      f"up to {sw['most_records']:,} records read and {sw['longest_s']:.2f} s per sweep"
      + (f"; skipped: {'; '.join(sw['skipped'])}" if sw["skipped"] else ""))  # fmt: skip
    p(f"  workers exited     {figures['worker_exit_status']}")
    if figures["ok"]:
        p("soak: OK")
    else:
        p("soak: FAILED")
        for failure in figures["failures"]:
            p(f"  - {failure}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; 0 when everything checked out."""
    settings = SoakSettings.from_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        figures = run_soak(settings)
    except SetupError as exc:
        print(f"soak: cannot run: {exc}", file=sys.stderr)
        return 2
    _print_summary(figures)
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"soak: figures written to {settings.json_path}")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
