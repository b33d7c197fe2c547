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
from pathlib import Path
from typing import Any

import anyio

from acall.calls import ConcurrencyMode
from acall.dto import InvocationStatus
from acall.errors import AcallError
from acall.hashing import REFERENCE_PREFIX
from acall.results import InvocationHandle
from acall.tasks import App
from acall.worker import current_invocation

__all__ = ["app", "run_demo"]

app = App("memory://demo", name="demo")

#: A key no value has (the reference of no content): reading it checks the store answers.
_PROBE_KEY = REFERENCE_PREFIX + "0" * 64


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
    while not stop.is_set():
        counts = await app.broker.counts()
        done = counts.get(InvocationStatus.SUCCESS, 0) + counts.get(InvocationStatus.FAILED, 0)
        rate = done / max(1e-9, time.perf_counter() - started)
        parts = ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items()) if n)
        _print(f"  progress: {done}/{total} finished ({rate:,.0f}/s) — {parts}", same_line=True)
        with anyio.move_on_after(0.5):
            await stop.wait()
    if sys.stdout.isatty():
        print()


def _start_worker(
    broker: str, store: str, concurrency: int, log_path: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "acall", "--log-level", "WARNING", "worker", "acall.demo:app",
        "--broker", broker, "--store", store, "--concurrency", str(concurrency),
        "--grace-period", "5",
    ]  # fmt: skip
    log = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _workdir(given: str | None) -> Path:
    workdir = Path(given or tempfile.mkdtemp(prefix="acall-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


async def run_demo(args: argparse.Namespace) -> None:
    """Run the demo described in the module docstring."""
    workdir = _workdir(args.workdir)
    broker = args.broker or f"sqlite:///{workdir}/acall-demo.db"
    store = args.store or broker
    app.configure(broker=broker, store=store)
    print(f"acall demo — broker {app.broker.url}, store {app.store.url}")
    async with app:
        # An unreachable broker or store fails here, in one line, before any worker
        # process is started.
        await app.broker.pending_count("default")
        await app.store.exists(_PROBE_KEY)
        worker_log = workdir / "worker.log"
        worker = _start_worker(broker, store, args.concurrency, worker_log)
        print(f"  worker process {worker.pid} started (log: {worker_log})")
        try:
            await _submit_and_wait(args)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    print(f"  worker process exited with status {worker.returncode}")


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
        f"in {submitted - started:.2f} s"
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

    counts = await app.broker.counts()
    stats = app.codec.stats
    print("summary")
    print(
        "  invocations by status: "
        + ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items()) if n)
    )
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
