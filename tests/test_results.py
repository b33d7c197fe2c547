"""Waiting for results: the ResultFuture of ``handle.result()`` and the app's watcher,
on every broker."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import shared_backend_url

from acall import App, ResultFuture, ResultTimeoutError, Task, TaskError, Worker
from acall.dto import new_invocation_id
from acall.errors import BrokerError


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return shared_backend_url(request.param, request, tmp_path)


@pytest.fixture
async def app(url: str) -> AsyncIterator[App]:
    application = App(url)
    async with application:
        yield application


@asynccontextmanager
async def running(app: App) -> AsyncIterator[Worker]:
    worker = Worker(app, handle_signals=False, poll_wait=0.05, concurrency=16)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        try:
            yield worker
        finally:
            worker.stop()


def gated_task(app: App) -> tuple[anyio.Event, Task[Any, int]]:
    """A task that returns its argument once the event is set."""
    gate = anyio.Event()

    @app.task
    async def gated(x: int) -> int:
        await gate.wait()
        return x

    return gate, gated


async def test_gathered_results_need_no_task_per_handle(app: App) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    handles = await double.submit_many([{"x": i} for i in range(300)])
    most_tasks = 0
    done = False

    async def count_tasks() -> None:
        # Sampled now and then (a busy loop would starve the broker's threads of the
        # GIL); a task per handle would live through the whole wait.
        nonlocal most_tasks
        while not done:
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
            await anyio.sleep(0.005)

    async with running(app), anyio.create_task_group() as tg:
        tg.start_soon(count_tasks)
        futures = [h.result(timeout=30) for h in handles]
        assert all(isinstance(f, ResultFuture) and asyncio.isfuture(f) for f in futures)
        assert [f.invocation_id for f in futures] == [h.invocation_id for h in handles]
        try:
            assert await asyncio.gather(*futures) == [2 * i for i in range(300)]
        finally:
            done = True
    # The worker's consumers and a few helpers, not one task per awaited handle.
    assert 0 < most_tasks < 60
    assert not app._results._waiting


async def test_waiting_for_finished_results_one_by_one_subscribes_to_nothing(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    handles = await double.submit_many([{"x": i} for i in range(20)])
    async with running(app):
        await asyncio.gather(*(h.result(timeout=30) for h in handles))
    subscriptions = 0
    watch_final = app.broker.watch_final

    def counted() -> AsyncGenerator[set[str], None]:
        nonlocal subscriptions
        subscriptions += 1
        return watch_final()

    monkeypatch.setattr(app.broker, "watch_final", counted)
    # A look-up each (or none in process): no subscription made and dropped per handle.
    assert [await h.result(timeout=30) for h in handles] == [2 * i for i in range(20)]
    assert subscriptions == 0


async def test_a_result_also_runs_as_a_coroutine(app: App) -> None:
    @app.task
    async def echo(x: str) -> str:
        return x

    handles = [await echo.submit(s) for s in ("a", "b", "c", "d")]
    out: list[str] = []

    async def keep(h: Any) -> None:
        out.append(await h.result(timeout=30))

    async with running(app):
        task = asyncio.create_task(handles[0].result(timeout=30))
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep, handles[1])
            tg.start_soon(handles[2].result)  # anyio wants a coroutine: it gets one
        assert await task == "a"
        assert await asyncio.wait_for(handles[3].result(), 30) == "d"
        assert out == ["b"]


async def test_closing_a_result_as_a_coroutine_abandons_the_wait(app: App) -> None:
    _, gated = gated_task(app)
    handle = await gated.submit(1)  # no worker: it stays pending
    waiting = handle.result()
    waiting.close()  # what anyio does to a coroutine whose task never started
    assert waiting.cancelled()
    assert not app._results._waiting


async def test_a_timeout_counts_from_the_call_and_the_invocation_goes_on(app: App) -> None:
    gate, gated = gated_task(app)
    handle = await gated.submit(2)
    async with running(app):
        pending = handle.result(timeout=0.2)
        await anyio.sleep(0.3)  # the time is up before anybody awaits it
        assert pending.done()
        with pytest.raises(ResultTimeoutError, match=r"did not finish within 0\.2 s"):
            await pending
        gate.set()
        assert await handle.result(timeout=30) == 2
    assert not app._results._waiting


async def test_cancelled_waits_leave_and_end_the_subscription(app: App) -> None:
    gate, gated = gated_task(app)
    handle = await gated.submit(7)
    async with running(app):
        futures = [handle.result() for _ in range(3)]
        await anyio.sleep(0.2)
        watching = app._results._watch_task
        assert watching is not None
        assert not watching.done()
        futures[1].cancel()  # from the middle of the chain, then the rest
        assert not futures[0].done()
        futures[0].cancel()
        futures[2].cancel()
        assert not app._results._waiting
        with anyio.fail_after(10):
            while not watching.done():
                await anyio.sleep(0.01)
        if app.broker.url.startswith("memory://"):
            assert not app.broker._data.watchers  # type: ignore[attr-defined]
        gate.set()
        # A new wait subscribes again.
        assert await handle.result(timeout=30) == 7


async def test_an_unknown_invocation_fails_the_wait(app: App) -> None:
    with pytest.raises(TaskError, match="unknown invocation"):
        await app.handle(new_invocation_id()).result(timeout=10)


async def test_closing_the_broker_fails_the_waits(app: App) -> None:
    _, gated = gated_task(app)
    handle = await gated.submit(1)  # no worker: it stays pending
    pending = handle.result()
    await anyio.sleep(0.2)  # subscribed
    await app.broker.close()
    with anyio.fail_after(10), pytest.raises(TaskError, match="broker was closed"):
        await pending


async def test_wait_final_gives_the_record(app: App) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    handle = await double.submit(21)
    async with running(app):
        record = await app.wait_final(handle.invocation_id, 30)
    assert record.status.is_final
    assert record.invocation_id == handle.invocation_id
    assert record.result == "42"


async def test_a_malformed_record_fails_only_its_own_waiters(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    app = App(f"sqlite:///{path}")

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async with app:
        good, bad = await double.submit(1), await double.submit(2)
        with sqlite3.connect(path) as conn:
            conn.execute(
                "UPDATE acall_invocations SET record = '{\"v\": 1}' WHERE id = ?",
                (bad.invocation_id,),
            )
        waiting_good, waiting_bad = good.result(timeout=30), bad.result(timeout=30)
        with anyio.fail_after(10), pytest.raises(BrokerError, match="is damaged"):
            await waiting_bad
        assert not waiting_good.done()
        async with running(app):
            assert await waiting_good == 2


def test_an_app_waits_again_on_a_new_event_loop() -> None:
    app = App("memory://results-two-loops")

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async def one(x: int) -> int:
        handle = await double.submit(x)
        async with running(app):
            result: int = await handle.result(timeout=30)
        return result

    assert asyncio.run(one(1)) == 2
    assert asyncio.run(one(2)) == 4
