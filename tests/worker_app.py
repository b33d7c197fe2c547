"""Tasks used by the worker tests, importable by worker subprocesses as worker_app:app."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import anyio

from acall import App
from acall.worker import current_invocation

app = App(os.environ.get("ACALL_TEST_BROKER", "memory://worker-tests"))


class CustomError(Exception):
    """A task-defined exception that clients should get back as itself."""


@dataclasses.dataclass
class Summary:
    count: int
    total: float


@app.task
async def add(a: int, b: int) -> int:
    return a + b


@app.task
def multiply_sync(a: int, b: int) -> int:
    return a * b


@app.task
async def signature_mix(a: Any, /, b: Any, *rest: Any, k: Any = 1, **extra: Any) -> list[Any]:
    """Every kind of parameter: the worker must pass each back the way it was bound."""
    return [a, b, list(rest), k, dict(sorted(extra.items()))]


@app.task
async def summarize(values: list[float]) -> Summary:
    return Summary(len(values), sum(values))


@app.task
async def explode(message: str) -> None:
    raise CustomError(message)


@app.task
def stop_iterating(items: list[int]) -> int:
    return next(iter(items))  # StopIteration for an empty list


@app.task(retries=3, backoff=0.01, retry_on=(CustomError,))
async def flaky(succeed_on: int) -> int:
    ctx = current_invocation()
    assert ctx is not None
    if ctx.attempt < succeed_on:
        raise CustomError(f"attempt {ctx.attempt}")
    return ctx.attempt


@app.task(retries=3, backoff=0.01, retry_on=(CustomError,))
async def wrong_kind() -> None:
    raise ValueError("not retried")


@app.task(timeout=0.2)
async def sleepy(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "woke"


@app.task(timeout=0.2)
def sleepy_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@app.task
async def echo_size(blob: str) -> str:
    return blob.upper()


@app.task
async def slow_square(x: int, seconds: float = 0.05) -> int:
    await anyio.sleep(seconds)
    return x * x


def logged_result(kind: str, x: int, payload: str = "") -> int:
    """What :func:`logged_async` / :func:`logged_sync` return: a function of the arguments."""
    mixed = (x * 2654435761 + len(payload)) % 2**31
    return mixed if kind == "async" else mixed ^ 0x5A5A5A5A


def _log_run(log_path: str, event: str, result: int | None = None) -> None:
    """Append ``EVENT ID PID ATTEMPT RESULT`` to *log_path* (see tests/procs.RunLog)."""
    ctx = current_invocation()
    assert ctx is not None
    shown = "-" if result is None else str(result)
    line = f"{event} {ctx.invocation_id} {os.getpid()} {ctx.attempt} {shown}\n".encode()
    # One write to a file opened for appending: lines of concurrent runs never mix.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task
async def logged_async(x: int, seconds: float, log_path: str, payload: str = "") -> int:
    """Logs its start, sleeps on the loop (a worker can be killed meanwhile), logs its end."""
    _log_run(log_path, "start")
    await anyio.sleep(seconds)
    result = logged_result("async", x, payload)
    _log_run(log_path, "done", result)
    return result


@app.task
def logged_sync(x: int, seconds: float, log_path: str, payload: str = "") -> int:
    """:func:`logged_async` as a plain function, run in a worker thread."""
    _log_run(log_path, "start")
    time.sleep(seconds)
    result = logged_result("sync", x, payload)
    _log_run(log_path, "done", result)
    return result


@app.task(retries=3, backoff=0.01)
async def payload_length(payload: str) -> int:
    """Retried on any error: a blob error that is retried shows as a second attempt."""
    return len(payload)
