"""``worker``: end-to-end no-op tasks through acall's worker, and beside SAQ, arq, pynenc.

One *round* submits N no-op tasks (``noop(i) -> i``), waits for every result and checks
them all; its rate is N / (time from the first submission to the last result). Workers
are started before the rounds (startup is not timed) and warmed up with a few tasks.
Each figure shows the best of its rounds (every round is in the JSON output).

1. acall on each broker, against an absolute target (2-core machine): ``memory://``
   with the :class:`~acall.Worker` in the benchmark's own event loop; SQLite (a temp
   file) and Redis (a ``redis-server`` started here) with ``python -m acall worker
   bench._acall_tasks:app --broker URL --concurrency 64`` in a separate process.
   Two client patterns: ``submit_many`` (one call), and 50 concurrent coroutines each
   awaiting ``task.submit(i)`` one after the other. acall awaits the results the
   idiomatic way: ``asyncio.gather`` over every handle's ``result()``.
2. On the same ``redis-server``: acall vs SAQ and vs arq, each with its own worker
   process at concurrency 64 and its client in this process. Same 50-submitter pattern
   for all three (SAQ ``enqueue``, arq ``enqueue_job``); SAQ and arq results are awaited
   by 50 coroutines polling their own slice of the jobs every 10 ms, in order (arq's
   ``job.result(poll_delay=0.01)``, SAQ's ``queue.job(key)``); a bulk line compares
   acall's ``submit_many`` with SAQ's ``queue.map`` (arq has no bulk enqueue). arq's
   worker polls its queue every 2 ms (its 0.5 s default caps it at 128 jobs/s) and logs
   warnings only, as the others do; SAQ's periodic sweep is moved past the benchmark's
   end (see ``bench/_saq_tasks.py``: under load it aborted freshly dequeued jobs).
3. On SQLite: acall vs pynenc 0.4.0 (all its components on a SQLite file, a
   ``ThreadRunner`` with 64 threads started as ``python -m pynenc --app
   bench._pynenc_tasks runner start``, its ``runner_tuning()`` loop sleeps of 10 ms),
   bulk submission on both sides (``submit_many`` / ``parallelize``). pynenc runs
   about 100 tasks/s here, so this figure uses fewer tasks.
4. Worker RSS (information): an idle worker after startup, and the peak while it drains
   10,000 and 100,000 invocations queued on SQLite (submitted before it starts,
   concurrency 16), sampled from ``/proc/PID/status`` every 20 ms for a few seconds.
   Prefetch is bounded by the free slots, so the two peaks should be alike.

While one system is timed, the worker processes of the others are paused (SIGSTOP) so
their idle polling takes no CPU from it. Every process and server started here is
stopped when the group ends, whatever happened (a round that outlives its deadline, or
a worker that exits, fails the group with the end of that worker's log).
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio

from bench._procs import Service, paused, rss_kib
from bench._support import timing_from_rounds, versus_limit
from bench.harness import BenchError, Figure, Settings, Target, compare, group

if TYPE_CHECKING:
    from acall import App
    from acall.testing import RedisServer

GROUP = "worker"

T = TypeVar("T")

CONCURRENCY: Final = 64
SUBMITTERS: Final = 50
#: How often SAQ and arq results are polled (and SAQ's ``map`` polls), seconds.
ANCHOR_POLL: Final = 0.01
#: arq's queue poll interval in its worker (seconds).
ARQ_WORKER_POLL: Final = 0.002
RSS_CONCURRENCY: Final = 16
RSS_SAMPLE_EVERY: Final = 0.02
WARMUP_TASKS: Final = 10

#: tasks/s targets of figure 1 (2-core machine).
TARGETS: Final = {"memory": 20_000.0, "SQLite": 2_000.0, "Redis": 5_000.0}


@dataclass(frozen=True)
class Plan:
    """How many tasks and rounds each part runs (full or --quick)."""

    rounds: int
    n: dict[str, int]
    anchors_n: int
    anchor_rounds: int
    pynenc_n: int
    pynenc_rounds: int
    rss_queued: tuple[int, int]
    rss_sample_s: float

    @classmethod
    def for_settings(cls, settings: Settings) -> Plan:
        if settings.quick:
            return cls(
                rounds=1,
                n={"memory": 4_000, "SQLite": 1_000, "Redis": 2_000},
                anchors_n=2_000,
                anchor_rounds=1,
                pynenc_n=200,
                pynenc_rounds=1,
                rss_queued=(5_000, 50_000),
                rss_sample_s=2.0,
            )
        return cls(
            rounds=3,
            n={"memory": 20_000, "SQLite": 5_000, "Redis": 10_000},
            anchors_n=10_000,
            anchor_rounds=2,
            pynenc_n=1_000,
            pynenc_rounds=2,
            rss_queued=(10_000, 100_000),
            rss_sample_s=3.0,
        )


class RoundFailed(RuntimeError):
    """A round could not finish: a worker process exited, or the deadline passed.

    Not a :class:`~bench.harness.BenchError` (which stops the whole run): the runner
    reports this group as failed, with the worker's log tail, and goes on.
    """


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# --------------------------------------------------------------------------- plumbing


async def _concurrently(
    n: int, submit: Callable[[int], Awaitable[T]], workers: int = SUBMITTERS
) -> list[T]:
    """``[await submit(i) for i in range(n)]`` from ``workers`` coroutines (i, i+workers...)."""
    out: dict[int, T] = {}

    async def one(k: int) -> None:
        for i in range(k, n, workers):
            out[i] = await submit(i)

    try:
        async with anyio.create_task_group() as tg:
            for k in range(min(workers, n)):
                tg.start_soon(one, k)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None
    return [out[i] for i in range(n)]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) exception group: the one worth reporting."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run blocking *fn* in a daemon thread (abandoned if the awaiting task is cancelled,
    so a client that would wait forever for a dead worker never blocks the exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, value, None)

    threading.Thread(target=target, name="bench-blocking-client", daemon=True).start()
    return await future


async def _guarded(
    fn: Callable[[], Awaitable[T]], services: Sequence[Service], timeout: float, what: str
) -> T:
    """``await fn()``, failing if it outlives *timeout* or one of *services* exits."""
    dead: list[str] = []
    error: BaseException | None = None
    result: list[T] = []
    try:
        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        for s in services:
                            message = s.exited()
                            if message is not None:
                                dead.append(message)
                                tg.cancel_scope.cancel()
                                return
                        await anyio.sleep(0.2)

                tg.start_soon(watch)
                try:
                    result.append(await fn())
                except Exception as exc:
                    error = exc
                tg.cancel_scope.cancel()
    except TimeoutError:
        raise RoundFailed(f"{what}: no result within {timeout:g} s") from None
    if dead:
        raise RoundFailed(f"{what}: {dead[0]}")
    if error is not None:
        raise error
    return result[0]


@dataclass
class _Side:
    """One contender of an end-to-end figure: a timed round and the processes it uses."""

    name: str
    run_round: Callable[[int], Awaitable[float]]
    services: tuple[Service, ...] = ()
    min_rate: float = 200.0  # tasks/s below which a round is considered stuck
    #: Awaited once before anything runs (nothing paused): the worker is fully started.
    ready: Callable[[], Awaitable[None]] | None = None
    seconds: list[float] = field(default_factory=list)


async def _interleaved(
    sides: Sequence[_Side], n: int, rounds: int, all_services: Sequence[Service]
) -> None:
    """Warm every side up, then run ``rounds`` rounds of ``n`` tasks in rotating order,
    the other sides' workers paused while one side runs."""
    for side in sides:
        if side.ready is not None:
            await _guarded(side.ready, side.services, 60.0, f"{side.name} worker startup")
    for r in range(-1, rounds):
        shift = max(r, 0) % len(sides)
        for side in [*sides[shift:], *sides[:shift]]:
            others = [s for s in all_services if s not in side.services]
            count = WARMUP_TASKS if r < 0 else n
            timeout = 120.0 + count / side.min_rate
            with paused(others):
                seconds = await _guarded(
                    functools.partial(side.run_round, count),
                    side.services,
                    timeout,
                    f"{side.name} round of {count} tasks",
                )
            if r >= 0:
                side.seconds.append(seconds)


def _check_results(what: str, results: Sequence[Any], n: int) -> None:
    if list(results) != list(range(n)):
        wrong = next((i for i, v in enumerate(results) if v != i), len(results))
        raise BenchError(
            f"{what}: wrong results ({len(results)} of {n}; first wrong at {wrong}: "
            f"{list(results)[wrong : wrong + 3]!r})"
        )


def _acall_worker(url: str, log_dir: Path, concurrency: int = CONCURRENCY) -> Service:
    return Service(
        "acall-worker",
        "acall",
        [
            "--log-level",
            "WARNING",
            "worker",
            "bench._acall_tasks:app",
            "--broker",
            url,
            "--concurrency",
            str(concurrency),
            "--grace-period",
            "5",
        ],
        log_dir=log_dir,
    )


def _opened(url: str) -> App:
    """The benchmark's acall app pointed at *url* (a closed app cannot be reopened, so
    every ``async with`` block gets a freshly configured broker and store)."""
    from bench._acall_tasks import app

    app.configure(broker=url)
    return app


# --------------------------------------------------------------------------- acall rounds

BULK: Final = "submit_many"
SUBMITTERS_PATTERN: Final = f"{SUBMITTERS} submitters"


def _acall_round(pattern: str) -> Callable[[int], Awaitable[float]]:
    from bench._acall_tasks import noop

    async def run(n: int) -> float:
        start = time.perf_counter()
        if pattern == BULK:
            handles = await noop.submit_many([{"i": i} for i in range(n)])
        else:
            handles = await _concurrently(n, noop.submit)
        results = await asyncio.gather(*(h.result() for h in handles))
        elapsed = time.perf_counter() - start
        _check_results(f"acall {pattern}", results, n)
        return elapsed

    return run


def _acall_figures(broker: str, sides: Sequence[_Side], n: int) -> Iterator[Figure]:
    limit = TARGETS[broker]
    for side in sides:
        best = n / min(side.seconds)
        timing = timing_from_rounds("acall", side.seconds, n)
        yield versus_limit(
            GROUP,
            f"{broker} {_k(n)}, {side.name}",
            "acall",
            best / 1000,
            "k/s",
            limit=limit / 1000,
            op=">=",
            description=(
                f"acall end-to-end no-op tasks/s on {broker} ({side.name}) >= {limit:,.0f}"
            ),
            details={"acall": timing.as_dict(), "tasks_per_round": n},
        )


# --------------------------------------------------------------------------- the group


@group(
    GROUP,
    "end-to-end no-op tasks: acall on memory/SQLite/Redis, vs SAQ and arq (Redis), vs "
    "pynenc (SQLite); worker RSS",
)
def bench_worker(settings: Settings) -> Iterator[Figure]:
    plan = Plan.for_settings(settings)
    with (
        tempfile.TemporaryDirectory(prefix="acall-bench-worker-") as tmp,
        asyncio.Runner() as runner,
    ):
        tmpdir = Path(tmp)
        yield from _memory(plan, runner)
        yield from _sqlite(plan, runner, tmpdir)
        yield from _redis(plan, runner, tmpdir)
        yield from _rss(plan, runner, tmpdir)


def _memory(plan: Plan, runner: asyncio.Runner) -> Iterator[Figure]:
    from acall import Worker
    from bench._acall_tasks import app

    n = plan.n["memory"]
    sides = [
        _Side(BULK, _acall_round(BULK)),
        _Side(SUBMITTERS_PATTERN, _acall_round(SUBMITTERS_PATTERN)),
    ]

    async def main() -> None:
        async with app:
            worker = Worker(app, concurrency=CONCURRENCY, handle_signals=False, grace_period=5)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await worker.started.wait()
                try:
                    await _interleaved(sides, n, plan.rounds, ())
                finally:
                    worker.stop()

    app.configure(broker="memory://")
    runner.run(main())
    yield from _acall_figures("memory", sides, n)


def _acall_on_worker(
    plan: Plan, runner: asyncio.Runner, backend: str, url: str, worker: Service
) -> Iterator[Figure]:
    """acall's own figures (bulk and concurrent submitters) against a worker process."""
    n = plan.n[backend]
    sides = [
        _Side(BULK, _acall_round(BULK), (worker,)),
        _Side(SUBMITTERS_PATTERN, _acall_round(SUBMITTERS_PATTERN), (worker,)),
    ]

    async def main() -> None:
        async with _opened(url):
            await _interleaved(sides, n, plan.rounds, (worker,))

    runner.run(main())
    yield from _acall_figures(backend, sides, n)


def _sqlite(plan: Plan, runner: asyncio.Runner, tmpdir: Path) -> Iterator[Figure]:
    """acall on SQLite (figure 1), then acall vs pynenc on SQLite (figure 3)."""
    url = f"sqlite:///{tmpdir}/acall.db"
    with _acall_worker(url, tmpdir) as worker:
        yield from _acall_on_worker(plan, runner, "SQLite", url, worker)
        yield from _versus_pynenc(plan, runner, tmpdir, url, worker)


def _versus_pynenc(
    plan: Plan, runner: asyncio.Runner, tmpdir: Path, acall_url: str, acall_worker: Service
) -> Iterator[Figure]:
    db = tmpdir / "pynenc.db"
    os.environ["ACALL_BENCH_PYNENC_DB"] = str(db)  # read when bench._pynenc_tasks is imported
    os.environ["ACALL_BENCH_CONCURRENCY"] = str(CONCURRENCY)
    try:
        import bench._pynenc_tasks as pt
    except ImportError as exc:
        raise BenchError(f"pynenc missing ({exc}); run the benchmarks with bench/run") from exc
    if (pt.app.config_values or {}).get("sqlite_db_path") != str(db):
        raise BenchError("bench._pynenc_tasks was imported before this group set its database path")

    def pynenc_round_sync(n: int) -> float:
        start = time.perf_counter()
        invocations = pt.noop.parallelize([(i,) for i in range(n)])
        results = sorted(invocations.results)  # in completion order
        elapsed = time.perf_counter() - start
        _check_results("pynenc parallelize", results, n)
        return elapsed

    async def pynenc_round(n: int) -> float:
        return await _in_daemon_thread(lambda: pynenc_round_sync(n))

    runner_proc = Service(
        "pynenc-runner",
        "pynenc",
        ["--app", "bench._pynenc_tasks", "runner", "start"],
        log_dir=tmpdir,
    )
    with runner_proc:
        sides = [
            _Side("acall", _acall_round(BULK), (acall_worker,)),
            _Side("pynenc", pynenc_round, (runner_proc,), min_rate=20.0),
        ]

        async def main() -> None:
            async with _opened(acall_url):
                await _interleaved(
                    sides, plan.pynenc_n, plan.pynenc_rounds, (acall_worker, runner_proc)
                )

        runner.run(main())
    n = plan.pynenc_n
    timings = {s.name: timing_from_rounds(s.name, s.seconds, n) for s in sides}
    yield compare(
        GROUP,
        f"SQLite {_k(n)}, bulk: vs pynenc",
        timings,
        "acall",
        "pynenc",
        metric="rate",
        target=Target(
            ">=",
            1,
            "acall end-to-end tasks/s on SQLite >= pynenc's (submit_many vs parallelize)",
        ),
    )


def _redis(plan: Plan, runner: asyncio.Runner, tmpdir: Path) -> Iterator[Figure]:
    """acall on Redis (figure 1), then acall vs SAQ and arq on the same server (figure 2)."""
    from acall.testing import RedisServer

    if RedisServer.find_executable() is None:
        raise BenchError("redis-server not found on PATH; install Redis to run this group")
    with RedisServer() as server:
        url = server.url_for(1)
        with _acall_worker(url, tmpdir) as worker:
            yield from _acall_on_worker(plan, runner, "Redis", url, worker)
            yield from _versus_saq_arq(plan, runner, tmpdir, server, url, worker)


def _versus_saq_arq(
    plan: Plan,
    runner: asyncio.Runner,
    tmpdir: Path,
    server: RedisServer,
    acall_url: str,
    acall_worker: Service,
) -> Iterator[Figure]:
    try:
        from arq import create_pool
        from arq.connections import RedisSettings
        from saq import Queue
        from saq.job import TERMINAL_STATUSES, Status
    except ImportError as exc:
        raise BenchError(f"saq / arq missing ({exc}); run the benchmarks with bench/run") from exc
    from bench._saq_tasks import QUEUE_NAME

    saq_url, arq_url = server.url_for(2), server.url_for(3)
    env = {"ACALL_BENCH_CONCURRENCY": str(CONCURRENCY)}
    saq_worker = Service(
        "saq-worker",
        "saq",
        ["bench._saq_tasks.settings"],
        log_dir=tmpdir,
        env={**env, "ACALL_BENCH_SAQ_URL": saq_url},
    )
    arq_worker = Service(
        "arq-worker",
        "arq",
        ["--custom-log-dict", "bench._arq_tasks.LOG_CONFIG", "bench._arq_tasks.WorkerSettings"],
        log_dir=tmpdir,
        env={**env, "ACALL_BENCH_ARQ_URL": arq_url, "ACALL_BENCH_ARQ_POLL": str(ARQ_WORKER_POLL)},
    )
    n = plan.anchors_n
    clients: dict[str, Any] = {}

    async def saq_result(job: Any) -> Any:
        queue = clients["saq"]
        while True:
            current = await queue.job(job.key)
            if current is not None and current.status in TERMINAL_STATUSES:
                if current.status != Status.COMPLETE:
                    raise RoundFailed(f"SAQ job {job.key} ended {current.status}: {current.error}")
                return current.result
            await asyncio.sleep(ANCHOR_POLL)

    async def saq_ready() -> None:
        # SAQ sweeps its queue when its worker starts; jobs enqueued meanwhile may be
        # aborted as "swept" (see bench/_saq_tasks.py). Its worker info appears after.
        for _ in range(600):
            if (await clients["saq"].info())["workers"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)

    async def saq_enqueue(i: int) -> Any:
        job = await clients["saq"].enqueue("noop", i=i)
        if job is None:
            raise BenchError(f"SAQ did not enqueue job {i}")
        return job

    async def saq_round(count: int) -> float:
        start = time.perf_counter()
        jobs = await _concurrently(count, saq_enqueue)
        results = await _concurrently(count, lambda i: saq_result(jobs[i]))
        elapsed = time.perf_counter() - start
        _check_results("SAQ", results, count)
        return elapsed

    async def saq_map_round(count: int) -> float:
        start = time.perf_counter()
        results = await clients["saq"].map(
            "noop", [{"i": i} for i in range(count)], poll_interval=ANCHOR_POLL
        )
        elapsed = time.perf_counter() - start
        _check_results("SAQ map", results, count)
        return elapsed

    async def arq_enqueue(i: int) -> Any:
        job = await clients["arq"].enqueue_job("noop", i)
        if job is None:
            raise BenchError(f"arq did not enqueue job {i}")
        return job

    async def arq_round(count: int) -> float:
        start = time.perf_counter()
        jobs = await _concurrently(count, arq_enqueue)
        results = await _concurrently(count, lambda i: jobs[i].result(poll_delay=ANCHOR_POLL))
        elapsed = time.perf_counter() - start
        _check_results("arq", results, count)
        return elapsed

    with saq_worker, arq_worker:
        everyone = (acall_worker, saq_worker, arq_worker)
        per_task = [
            _Side("acall", _acall_round(SUBMITTERS_PATTERN), (acall_worker,)),
            _Side("SAQ", saq_round, (saq_worker,), ready=saq_ready),
            _Side("arq", arq_round, (arq_worker,)),
        ]
        bulk = [
            _Side("acall", _acall_round(BULK), (acall_worker,)),
            _Side("SAQ", saq_map_round, (saq_worker,)),
        ]

        async def main() -> None:
            clients["saq"] = Queue.from_url(saq_url, name=QUEUE_NAME)
            clients["arq"] = await create_pool(RedisSettings.from_dsn(arq_url))
            try:
                await clients["saq"].connect()
                async with _opened(acall_url):
                    await _interleaved(per_task, n, plan.anchor_rounds, everyone)
                    await _interleaved(bulk, n, plan.anchor_rounds, everyone)
            finally:
                await clients["saq"].disconnect()
                await clients["arq"].aclose()

        runner.run(main())

    for sides, pattern in ((per_task, SUBMITTERS_PATTERN), (bulk, "bulk")):
        timings = {s.name: timing_from_rounds(s.name, s.seconds, n) for s in sides}
        for anchor in [s.name for s in sides[1:]]:
            yield compare(
                GROUP,
                f"Redis {_k(n)}, {pattern}: vs {anchor}",
                timings,
                "acall",
                anchor,
                metric="rate",
                target=Target(
                    ">=", 1, f"acall end-to-end tasks/s >= {anchor}'s ({pattern}; acall leads)"
                ),
            )


# --------------------------------------------------------------------------- RSS


@dataclass(frozen=True)
class _RssRun:
    queued: int
    peak_kib: int
    samples: int
    finished: int


def _rss(plan: Plan, runner: asyncio.Runner, tmpdir: Path) -> Iterator[Figure]:
    idle = _rss_run(runner, tmpdir, 0, 1.0)
    yield Figure(
        GROUP,
        "RSS idle worker (after startup)",
        "acall",
        idle.peak_kib / 1024,
        "MiB",
        details={"peak_kib": idle.peak_kib, "samples": idle.samples},
    )
    previous, previous_name = idle, "idle"
    for queued in plan.rss_queued:
        run = _rss_run(runner, tmpdir, queued, plan.rss_sample_s)
        yield Figure(
            GROUP,
            f"RSS peak, {queued:,} queued",
            "acall",
            run.peak_kib / 1024,
            "MiB",
            anchor_name=previous_name,
            anchor_value=previous.peak_kib / 1024,
            ratio=run.peak_kib / previous.peak_kib,
            details={
                "peak_kib": run.peak_kib,
                "samples": run.samples,
                "sample_s": plan.rss_sample_s,
                "finished_while_sampling": run.finished,
                "worker_concurrency": RSS_CONCURRENCY,
            },
        )
        previous, previous_name = run, f"{_k(queued)} queued"


def _rss_run(runner: asyncio.Runner, tmpdir: Path, queued: int, sample_s: float) -> _RssRun:
    """Peak RSS of an acall worker (concurrency 16) on a SQLite file with *queued*
    invocations submitted before it starts; with none, after one warm-up task."""
    from acall import InvocationStatus
    from bench._acall_tasks import noop

    url = f"sqlite:///{tmpdir}/rss-{queued}.db"

    async def submit() -> None:
        async with _opened(url):
            await noop.submit_many([{"i": i} for i in range(queued)])

    async def warm_up() -> None:
        async with _opened(url):
            handle = await noop.submit(0)
            if await handle.result(timeout=120) != 0:
                raise BenchError("RSS: the warm-up task returned a wrong result")

    async def finished() -> int:
        async with _opened(url) as app:
            counts = await app.broker.counts()
            return counts.get(InvocationStatus.SUCCESS, 0)

    if queued:
        runner.run(submit())
    with _acall_worker(url, tmpdir, RSS_CONCURRENCY) as worker:
        if not queued:
            runner.run(_guarded(warm_up, (worker,), 120, "RSS warm-up"))
            time.sleep(0.3)
        peak = samples = 0
        end = time.monotonic() + sample_s
        while time.monotonic() < end:
            worker.check()
            peak = max(peak, rss_kib(worker.pid))
            samples += 1
            time.sleep(RSS_SAMPLE_EVERY)
        worker.check()
        done = runner.run(finished())
    if queued and done == 0:
        raise BenchError(f"RSS: the worker ran nothing of the {queued:,} queued invocations")
    return _RssRun(queued, peak, samples, done)
