"""Tasks used by the worker tests, importable by worker subprocesses as worker_app:app."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

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
async def summarize(values: list[float]) -> Summary:
    return Summary(len(values), sum(values))


@app.task
async def explode(message: str) -> None:
    raise CustomError(message)


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


@app.task
def record_and_square(x: int, seconds: float, log_dir: str) -> int:
    """Sleeps (so a worker can be killed mid-task) and logs each completed run."""
    time.sleep(seconds)
    ctx = current_invocation()
    assert ctx is not None
    with (Path(log_dir) / f"{ctx.invocation_id}.{os.getpid()}.{ctx.attempt}").open("w") as f:
        f.write(str(x * x))
    return x * x
