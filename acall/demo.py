"""``acall demo``: a worker process and a realistic mix of submitted calls.

On the embedded SQLite default it starts ``acall worker acall.demo:app`` in a separate
process, then submits, from this process:

* hundreds of small calls;
* calls with multi-MB arguments, which are offloaded to the store;
* a batch sharing one large argument (serialized and stored once);
* the same call twice under ``KEYS`` concurrency (the second is deduplicated);
* a flaky call that fails twice and succeeds on its third attempt, and one that
  exhausts its retries.

It shows progress while the worker runs them and ends with a summary: invocations by
status, bytes inline vs offloaded, dedup hits and throughput. Every result is checked.

The worker is stopped whatever happens: the demo finishing, failing, or receiving
SIGTERM or SIGINT (it then exits with status 128 + the signal number). A worker that
exits early ends the demo with one error quoting its log; a broker unreachable for a
while (a Redis restart) pauses the progress display without ending the demo.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from acall.calls import ConcurrencyMode
from acall.cli import check_reachable
from acall.dto import InvocationStatus
from acall.errors import AcallError, BrokerUnavailableError, ConfigurationError
from acall.results import InvocationHandle
from acall.tasks import App
from acall.worker import current_invocation

__all__ = ["app", "run_demo"]

app = App("memory://demo", name="demo")


class FlakyError(RuntimeError):
    """Raised on purpose by :func:`flaky` to show retries."""


@app.task
async def add(a: int, b: int) -> int:
    """A small call."""
    return a + b


@app.task
def digest(samples: list[float], label: str) -> str:
    """A call with a multi-MB argument, run in a worker thread."""
    return f"{label}:{hashlib.sha256(repr(samples).encode()).hexdigest()[:16]}"


@app.task
async def score(table: dict[str, int], key: str) -> int:
    """One call of a batch that shares a large *table*."""
    return table[key] * 2


@app.task(concurrency=ConcurrencyMode.KEYS, key_arguments=["user_id"])
async def report(user_id: int, note: str) -> str:
    """Deduplicated per user while one is pending or running."""
    await anyio.sleep(0.5)
    return f"report for user {user_id}"


@app.task(retries=3, backoff=0.2, retry_on=(FlakyError,))
async def flaky(succeed_on: int) -> int:
    """Fails until attempt *succeed_on*."""
    ctx = current_invocation()
    attempt = ctx.attempt if ctx is not None else 1
    if attempt < succeed_on:
        raise FlakyError(f"attempt {attempt} fails on purpose")
    return attempt


def _print(line: str, *, same_line: bool = False) -> None:
    if same_line and sys.stdout.isatty():
        print("\r" + line.ljust(100), end="", flush=True)
    else:
        print(line, flush=True)


async def _progress(total: int, started: float, stop: anyio.Event) -> None:
    unreachable = False
    try:
        while not stop.is_set():
            try:
                counts = await app.broker.counts()
            except BrokerUnavailableError as exc:
                # A Redis restart, say: results are still awaited (their watcher
                # retries), so only say so, once per outage, and keep polling.
                if not unreachable:
                    line = f"  progress: broker unreachable ({_first_line(exc)}); waiting"
                    _print(line, same_line=True)
                unreachable = True
            else:
                unreachable = False
                done = counts.get(InvocationStatus.SUCCESS, 0)
                done += counts.get(InvocationStatus.FAILED, 0)
                rate = done / max(1e-9, time.perf_counter() - started)
                parts = ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items()) if n)
                line = f"  progress: {done}/{total} finished ({rate:,.0f}/s) — {parts}"
                _print(line, same_line=True)
            with anyio.move_on_after(0.5):
                await stop.wait()
    finally:  # cancelled too (a signal, the worker gone): end the progress line
        if sys.stdout.isatty():
            print(flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _start_worker(
    broker: str, store: str, concurrency: int, log_path: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "acall", "--log-level", "WARNING", "worker", "acall.demo:app",
        "--broker", broker, "--store", store, "--concurrency", str(concurrency),
        "--grace-period", "5",
    ]  # fmt: skip
    with log_path.open("wb") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


async def _exited(worker: subprocess.Popen[bytes], *, interval: float) -> None:
    """Return once *worker* has exited (polled: a Popen has no awaitable wait)."""
    while True:
        if worker.poll() is not None:
            return
        await anyio.sleep(interval)


async def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker (it drains for its 5 s grace period); SIGKILL it after 15 s."""
    with anyio.CancelScope(shield=True):
        if worker.poll() is not None:
            return
        worker.send_signal(signal.SIGTERM)
        with anyio.move_on_after(15):
            await _exited(worker, interval=0.05)
        if worker.poll() is None:
            worker.kill()
            await anyio.to_thread.run_sync(worker.wait)


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"status {returncode}"


def _last_log_line(log_path: Path) -> str:
    """The last non-empty line of the worker's log (shortened), or why there is none."""
    try:
        with log_path.open("rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - 65536))
            tail = log.read().decode(errors="replace")
    except OSError as exc:
        return f"its log {log_path} cannot be read ({exc.strerror or exc})"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return f"its log {log_path} is empty"
    last = lines[-1] if len(lines[-1]) <= 300 else lines[-1][:297] + "..."
    return f"last line of its log: {last!r} (full log: {log_path})"


def _worker_exited_error(worker: subprocess.Popen[bytes], log_path: Path) -> AcallError:
    status = _exit_status(worker.returncode)
    return AcallError(
        f"the demo's worker process {worker.pid} exited early ({status}), so the demo "
        f"cannot finish; {_last_log_line(log_path)}"
    )


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before anything starts, options the demo cannot run with."""
    for option, url in (("--broker", args.broker), ("--store", args.store)):
        if url is not None and url.partition("://")[0].strip().lower() == "memory":
            raise ConfigurationError(
                f"{option} {url!r}: the demo's worker runs in another process, which "
                "cannot see an in-process memory:// backend (the demo would wait forever); "
                f"omit {option} for the default SQLite file in --workdir, or give a "
                "redis:// URL"
            )
    if args.concurrency < 1:
        raise ConfigurationError(f"--concurrency must be 1 or more, got {args.concurrency}")
    if args.small < 0:
        raise ConfigurationError(f"--small must be 0 or more, got {args.small}")


def _workdir(given: str | None) -> Path:
    """The demo's directory (created if need be), checked to be one it can write to."""
    path = Path(given) if given is not None else None
    try:
        if path is None:
            path = Path(tempfile.mkdtemp(prefix="acall-demo-"))
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass  # the SQLite file and the worker log go here
    except OSError as exc:
        where = path if path is not None else Path(tempfile.gettempdir())
        if where.exists() and not where.is_dir():
            reason = "it is an existing file, not a directory"
        else:
            reason = f"{exc.strerror or exc}" + (
                f": {exc.filename}" if exc.filename and str(exc.filename) != str(where) else ""
            )
        option = "--workdir" if given is not None else "the temporary directory"
        raise ConfigurationError(
            f"{option} {str(where)!r} cannot hold the demo's files ({reason}); give "
            "--workdir a directory the demo can create or write to"
        ) from None
    return path


async def run_demo(args: argparse.Namespace) -> None:
    """Run the demo described in the module docstring."""
    _check_options(args)
    workdir = _workdir(args.workdir)
    broker = args.broker or f"sqlite:///{workdir}/acall-demo.db"
    store = args.store or broker
    app.configure(broker=broker, store=store)
    print(f"acall demo — broker {app.broker.url}, store {app.store.url}", flush=True)
    async with app:
        # An unreachable broker or store fails here, in one line, before any worker
        # process is started.
        await check_reachable(app)
        worker_log = workdir / "worker.log"
        # Listening before the worker starts: from then on SIGTERM or SIGINT must not
        # end this process without stopping the worker (it would outlive the demo).
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            worker = _start_worker(broker, store, args.concurrency, worker_log)
            print(f"  worker process {worker.pid} started (log: {worker_log})", flush=True)
            try:
                received = await _supervised(args, worker, worker_log, signals)
            finally:
                await _stop_worker(worker)
    print(f"  worker process exited with {_exit_status(worker.returncode)}", flush=True)
    if received is not None:
        name = signal.Signals(received).name
        print(f"acall: demo interrupted by {name}; its worker was stopped", file=sys.stderr)
        raise SystemExit(128 + received)


async def _supervised(
    args: argparse.Namespace,
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    signals: AsyncIterator[int],
) -> int | None:
    """Submit and wait, unless a signal arrives (returned) or the worker exits first
    (raised as an error)."""
    received: int | None = None
    worker_gone = False
    completed = False
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            nonlocal received
            async for signum in signals:
                received = signum
                tg.cancel_scope.cancel()
                return

        async def watch_worker() -> None:
            nonlocal worker_gone
            await _exited(worker, interval=0.2)
            worker_gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        tg.start_soon(watch_worker)
        await _submit_and_wait(args)
        completed = True
        tg.cancel_scope.cancel()
    if received is not None:
        return received
    if worker_gone and not completed:
        raise _worker_exited_error(worker, worker_log)
    return None


async def _submit_and_wait(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    handles: list[tuple[str, InvocationHandle[Any], Any]] = []
    n_small = args.small

    # Many clients at once, as a service would submit: concurrent submissions share
    # broker round trips (one SQLite transaction or Redis script call per batch).
    small: list[InvocationHandle[Any] | None] = [None] * n_small

    async def submit_small(i: int) -> None:
        small[i] = await add.submit(i, i)

    async with anyio.create_task_group() as tg:
        for i in range(n_small):
            tg.start_soon(submit_small, i)
    handles.extend(("small", h, 2 * i) for i, h in enumerate(small) if h is not None)
    big = [[float(i * j % 997) for i in range(200_000)] for j in range(4)]
    for j, samples in enumerate(big):
        expected = f"big{j}:{hashlib.sha256(repr(samples).encode()).hexdigest()[:16]}"
        handles.append(("large-arg", await digest.submit(samples, f"big{j}"), expected))
    table = {f"k{i}": i for i in range(150_000)}
    batch = await score.submit_many(
        [{"key": f"k{i}"} for i in range(100)], common_args={"table": table}
    )
    handles.extend(("batch", h, 2 * i) for i, h in enumerate(batch))
    first = await report.submit(7, "first request")
    second = await report.submit(7, "same user again")
    handles.append(("dedup", first, "report for user 7"))
    handles.append(("dedup", second, "report for user 7"))
    handles.append(("retry", await flaky.submit(3), 3))
    handles.append(("retry-exhausted", await flaky.submit(99), FlakyError))
    submitted = time.perf_counter()
    dedup_hits = sum(h.deduplicated for _, h, _ in handles)
    unique = len({h.invocation_id for _, h, _ in handles})
    print(
        f"  submitted {len(handles)} calls ({unique} invocations, {dedup_hits} deduplicated) "
        f"in {submitted - started:.2f} s",
        flush=True,
    )

    stop = anyio.Event()
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_progress, unique, started, stop)
        small_done = started
        for kind, handle, expected in handles:
            if kind != "small" and small_done == started:
                small_done = time.perf_counter()
            try:
                value = await handle.result(timeout=120)
                ok = value == expected
            except FlakyError:
                ok = expected is FlakyError
            except AcallError as exc:
                ok = False
                wrong.append(f"{kind}: {exc}")
            outcomes[f"{kind} {'ok' if ok else 'WRONG'}"] += 1
            if not ok and len(wrong) < 5:
                wrong.append(f"{kind}: {handle}")
        stop.set()
    elapsed = time.perf_counter() - started

    try:
        counts = await app.broker.counts()
        by_status = ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items()) if n)
    except BrokerUnavailableError as exc:
        by_status = f"unknown (broker unreachable: {_first_line(exc)})"
    stats = app.codec.stats
    print("summary")
    print(f"  invocations by status: {by_status}")
    print("  results checked:       " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"  bytes inline:          {stats['inline_chars']:,} (serialized characters)")
    print(
        f"  bytes offloaded:       {stats['offloaded_bytes']:,} in {stats['uploads']} blobs "
        f"({stats['uploads_skipped']} re-uploads avoided)"
    )
    print(f"  dedup hits:            {dedup_hits}")
    small_rate = n_small / max(1e-9, small_done - started)
    print(
        f"  throughput:            {small_rate:,.0f} small calls/s end to end "
        f"(submit -> worker process -> result)"
    )
    print(
        f"  total:                 {unique} invocations in {elapsed:.2f} s "
        "(includes retry backoff and the deliberately slow calls)"
    )
    if wrong:
        raise AcallError("demo results were wrong: " + "; ".join(wrong))
