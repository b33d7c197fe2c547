"""The asyncio worker in-process on the memory broker: outcomes, retries, timeouts,
limits and shutdown. Cross-process behaviour (SIGKILL, CLI) is in test_worker_process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import pytest
import worker_app as wa

from acall import (
    App,
    BlobNotFoundError,
    InvocationHandle,
    InvocationStatus,
    RemoteTaskError,
    ResultTimeoutError,
    SerializationError,
    UnknownTaskError,
    WorkerCrashError,
)
from acall.calls import ConcurrencyMode
from acall.hashing import REFERENCE_PREFIX
from acall.worker import Worker


@pytest.fixture
async def app() -> AsyncIterator[App]:
    wa.app.configure(broker="memory://", store="memory://")
    async with wa.app:
        yield wa.app


async def _with_worker(app: App, body: Any, **options: Any) -> Worker:
    worker = Worker(app, handle_signals=False, poll_wait=0.05, **options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        try:
            with anyio.fail_after(30):
                await body()
        finally:
            worker.stop()
    return worker


async def test_async_and_sync_tasks_round_trip(app: App) -> None:
    async def body() -> None:
        h1 = await wa.add.submit(2, 3)
        h2 = await wa.multiply_sync.submit(4, b=5)
        assert await h1.result(timeout=5) == 5
        assert await h2.result(timeout=5) == 20
        assert await h1.status() is InvocationStatus.SUCCESS
        record = await h2.record()
        assert record.attempt == 1
        assert record.worker_id is not None

    worker = await _with_worker(app, body)
    assert worker.stats.succeeded == 2


async def test_every_kind_of_parameter_reaches_the_function(app: App) -> None:
    async def body() -> None:
        mixed = await wa.signature_mix.submit(1, 2, 3, 4, k=5, x=6, w=7)
        plain = await wa.multiply_sync.submit(b=3, a=7)
        defaults = await wa.signature_mix.submit("a", "b")
        assert await mixed.result(timeout=5) == [1, 2, [3, 4], 5, {"w": 7, "x": 6}]
        assert await plain.result(timeout=5) == 21
        assert await defaults.result(timeout=5) == ["a", "b", [], 1, {}]

    await _with_worker(app, body)


async def test_typed_return_value(app: App) -> None:
    async def body() -> None:
        h = await wa.summarize.submit([1.0, 2.5])
        assert await h.result(timeout=5) == wa.Summary(2, 3.5)

    await _with_worker(app, body)


async def test_task_exception_comes_back_as_itself(app: App) -> None:
    async def body() -> None:
        h = await wa.explode.submit("kaboom")
        with pytest.raises(wa.CustomError, match="kaboom") as info:
            await h.result(timeout=5)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert h.invocation_id in notes
        assert "remote traceback" in notes
        record = await h.record()
        assert record.status is InvocationStatus.FAILED
        assert record.error is not None
        assert record.error.type_name == "worker_app.CustomError"

    await _with_worker(app, body)


async def test_stop_iteration_comes_back_as_a_remote_task_error(app: App) -> None:
    """Raised from result() as itself, it would become a bare RuntimeError."""

    async def body() -> None:
        h = await wa.stop_iterating.submit([])
        with pytest.raises(RemoteTaskError, match="StopIteration") as info:
            await h.result(timeout=5)
        assert isinstance(info.value.__cause__, StopIteration)
        assert await (await wa.stop_iterating.submit([7])).result(timeout=5) == 7

    await _with_worker(app, body)


async def test_a_task_raising_what_is_not_an_exception_fails_alone(app: App) -> None:
    """sys.exit(), KeyboardInterrupt or a CancelledError raised by a task's own code is
    that invocation's failure: the worker goes on (ending it would only pass the
    invocation to the next worker, and the next)."""
    import asyncio
    import sys

    @app.task(name="raises_base")
    async def raises_base(kind: str) -> None:
        if kind == "cancelled":
            raise asyncio.CancelledError()
        if kind == "exit":
            sys.exit(3)
        raise KeyboardInterrupt

    @app.task(name="raises_base_in_a_thread")
    def raises_base_in_a_thread(kind: str) -> None:
        if kind == "exit":
            sys.exit(4)
        raise KeyboardInterrupt

    async def body() -> None:
        handles = [
            (await raises_base.submit("cancelled"), "CancelledError"),
            (await raises_base.submit("exit"), "SystemExit"),
            (await raises_base.submit("interrupt"), "KeyboardInterrupt"),
            (await raises_base_in_a_thread.submit("exit"), "SystemExit"),
            (await raises_base_in_a_thread.submit("interrupt"), "KeyboardInterrupt"),
        ]
        for handle, name in handles:
            with pytest.raises(RemoteTaskError, match=name):
                await handle.result(timeout=5)
            record = await handle.record()
            assert record.status is InvocationStatus.FAILED
            assert record.error is not None
            assert record.error.type_name.endswith(name)
        assert await (await wa.add.submit(1, 2)).result(timeout=5) == 3  # still working

    worker = await _with_worker(app, body)
    assert (worker.stats.failed, worker.stats.released) == (5, 0)
    del app.tasks[raises_base.key], app.tasks[raises_base_in_a_thread.key]


async def test_retries_until_success(app: App) -> None:
    async def body() -> None:
        h = await wa.flaky.submit(3)
        assert await h.result(timeout=10) == 3
        record = await h.record()
        assert record.attempt == 3
        assert record.status is InvocationStatus.SUCCESS

    worker = await _with_worker(app, body)
    assert worker.stats.retried == 2


async def test_retries_exhausted(app: App) -> None:
    async def body() -> None:
        h = await wa.flaky.submit(10)
        with pytest.raises(wa.CustomError, match="attempt 4"):
            await h.result(timeout=10)
        assert (await h.record()).attempt == 4

    await _with_worker(app, body)


async def test_exceptions_outside_retry_on_fail_at_once(app: App) -> None:
    async def body() -> None:
        h = await wa.wrong_kind.submit()
        with pytest.raises(ValueError, match="not retried"):
            await h.result(timeout=5)
        assert (await h.record()).attempt == 1

    await _with_worker(app, body)


@pytest.mark.parametrize("task_name", ["sleepy", "sleepy_sync"])
async def test_timeouts(app: App, task_name: str) -> None:
    task = getattr(wa, task_name)

    async def body() -> None:
        fast = await task.submit(0.01)
        slow = await task.submit(2.0)
        assert await fast.result(timeout=5) == "woke"
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await slow.result(timeout=5)
        assert time.monotonic() - started < 1.5

    await _with_worker(app, body)


async def test_large_arguments_and_results_are_offloaded(app: App) -> None:
    blob = "abc" * 200_000

    async def body() -> None:
        h = await wa.echo_size.submit(blob)
        record = await h.record()
        assert record.call.serialized_arguments["blob"].startswith(REFERENCE_PREFIX)
        assert await h.result(timeout=10) == blob.upper()
        done = await h.record()
        assert done.result is not None
        assert done.result.startswith(REFERENCE_PREFIX)

    await _with_worker(app, body)


async def test_missing_blob_fails_the_invocation_and_worker_stays_healthy(app: App) -> None:
    async def body() -> None:
        h = await wa.echo_size.submit("q" * 5000)
        ref = (await h.record()).call.serialized_arguments["blob"]
        await app.store.delete(ref)
        with pytest.raises(BlobNotFoundError) as info:
            await h.result(timeout=5)
        assert ref in str(info.value)
        assert (await h.record()).attempt == 1  # not retried: retrying cannot help
        assert await (await wa.add.submit(1, 1)).result(timeout=5) == 2

    await _with_worker(app, body)


async def test_unknown_task_fails_clearly(app: App) -> None:
    other = App(app.broker, app.store)

    @other.task(name="not_in_worker")
    async def ghost() -> None: ...

    async def body() -> None:
        h = await ghost.submit()
        with pytest.raises(UnknownTaskError, match="not registered"):
            await app.handle(h.invocation_id).result(timeout=5)

    await _with_worker(app, body)


async def test_concurrency_bounds_running_and_prefetched(app: App) -> None:
    running = 0
    peak = 0

    @app.task(name="probe")
    async def probe() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    async def body() -> None:
        handles = [await probe.submit() for _ in range(60)]
        for h in handles:
            await h.result(timeout=10)

    worker = await _with_worker(app, body, concurrency=4)
    assert peak == 4
    assert worker.stats.received == 60
    del app.tasks[probe.key]


async def _stop_once_taken(
    worker: Worker, submitted: int, seconds: float, taken: int, settle: float = 0.0
) -> list[InvocationHandle[int]]:
    """Run *worker* on *submitted* slow squares of *seconds* each; stop it once it has
    taken *taken* entries and, *settle* seconds later, still no more."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        handles = [await wa.slow_square.submit(i, seconds) for i in range(submitted)]
        with anyio.fail_after(5):
            while worker.stats.received < taken:
                await anyio.sleep(0.01)
        await anyio.sleep(settle)
        assert worker.stats.received == taken
        worker.stop()
    return handles


async def test_prefetched_entries_are_bounded_and_go_back_unstarted_on_stop(app: App) -> None:
    first = Worker(
        app, handle_signals=False, poll_wait=0.05, concurrency=2, prefetch=3, grace_period=10
    )
    # A worker holding more than 2 + 3 would have taken more within 0.2 s; the tasks
    # last 1 s, so the two running ones are still running then.
    handles = await _stop_once_taken(first, 10, 1.0, taken=5, settle=0.2)
    # The two running finished within the grace period; the three waiting went back.
    assert (first.stats.succeeded, first.stats.released) == (2, 3)
    assert first.stats.received == 5
    # Those three never started: they wait again, no attempt used, like the other five.
    records = [await app.broker.get(h.invocation_id) for h in handles]
    heads = [(r.status, r.attempt, r.worker_id) for r in records if r is not None]
    assert sorted(heads, key=str) == sorted(
        [(InvocationStatus.SUCCESS, 1, first.worker_id)] * 2
        + [(InvocationStatus.PENDING, 0, None)] * 8,
        key=str,
    )

    async def body() -> None:
        assert [await h.result(timeout=20) for h in handles] == [i * i for i in range(10)]

    second = await _with_worker(app, body, concurrency=10, prefetch=0)
    assert second.stats.succeeded == 8
    for handle in handles:
        record = await app.broker.get(handle.invocation_id)
        assert record is not None
        assert record.attempt == 1


def test_prefetch_must_not_be_negative(app: App) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        Worker(app, prefetch=-1)


async def test_dedup_returns_the_pending_invocation(app: App) -> None:
    @app.task(name="dedup_probe", concurrency=ConcurrencyMode.ARGUMENTS)
    async def dedup_probe(x: int) -> int:
        await anyio.sleep(0.2)
        return x

    async def body() -> None:
        first = await dedup_probe.submit(1)
        second = await dedup_probe.submit(1)
        other = await dedup_probe.submit(2)
        assert second.deduplicated
        assert second.invocation_id == first.invocation_id
        assert not other.deduplicated
        assert await second.result(timeout=5) == 1
        third = await dedup_probe.submit(1)  # the first is final now: a new invocation
        assert not third.deduplicated
        assert third.invocation_id != first.invocation_id
        assert await third.result(timeout=5) == 1

    await _with_worker(app, body)
    del app.tasks[dedup_probe.key]


async def test_graceful_stop_finishes_running_work(app: App) -> None:
    worker = Worker(app, handle_signals=False, poll_wait=0.05, concurrency=4, grace_period=5)
    handles = await _stop_once_taken(worker, 4, 0.3, taken=4)
    assert worker.stats.succeeded == 4
    assert [await h.result(timeout=1) for h in handles] == [0, 1, 4, 9]


async def test_grace_period_over_hands_work_back(app: App) -> None:
    first = Worker(app, handle_signals=False, poll_wait=0.05, concurrency=2, grace_period=0.1)
    handles = await _stop_once_taken(first, 2, 1.0, taken=2)
    assert first.stats.released == 2
    assert {await h.status() for h in handles} == {InvocationStatus.PENDING}
    # Cut short by the worker's shutdown, not by the task: the attempt is not counted.
    for handle in handles:
        record = await app.broker.get(handle.invocation_id)
        assert record is not None
        assert (record.attempt, record.worker_id) == (0, None)

    async def body() -> None:
        assert [await h.result(timeout=10) for h in handles] == [0, 1]

    second = await _with_worker(app, body)
    assert second.stats.succeeded == 2
    for handle in handles:
        record = await app.broker.get(handle.invocation_id)
        assert record is not None
        assert record.attempt == 1


async def test_final_invocation_delivered_again_is_not_rerun(app: App) -> None:
    """A worker that recorded SUCCESS and died before acking: the redelivered entry is
    acknowledged without running the task again."""
    h = await wa.add.submit(1, 2)
    (delivery,) = await app.broker.receive(
        ["default"], 1, consumer="dead-worker", visibility_timeout=0.2, wait=1
    )
    record = await h.record()
    await app.broker.update(attrs.evolve(record, status=InvocationStatus.SUCCESS, result="3"))
    # ... and no ack: the entry comes back after the visibility timeout.
    worker = Worker(app, handle_signals=False, poll_wait=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            with anyio.fail_after(10):
                while worker.stats.duplicates == 0:
                    await anyio.sleep(0.01)
        finally:
            worker.stop()
    assert delivery.invocation_id == h.invocation_id
    assert worker.stats.succeeded == 0
    assert await h.result(timeout=1) == 3
    assert await app.broker.pending_count("default") == 0


async def test_result_timeout(app: App) -> None:
    h = await wa.add.submit(1, 1)  # no worker running
    with pytest.raises(ResultTimeoutError, match="did not finish"):
        await h.result(timeout=0.1)
    assert await h.status() is InvocationStatus.PENDING


async def test_entries_delivered_too_often_fail_instead_of_looping(app: App) -> None:
    """A task that kills its workers is not redelivered forever."""
    h = await wa.add.submit(2, 2)
    for _ in range(3):  # three "workers" take it and die without an outcome
        (taken,) = await app.broker.receive(
            ["default"], 1, consumer="doomed", visibility_timeout=0.05, wait=1
        )
        await anyio.sleep(0.06)
    assert taken.invocation_id == h.invocation_id

    async def body() -> None:
        with pytest.raises(WorkerCrashError, match="delivered 4 times"):
            await h.result(timeout=5)

    await _with_worker(app, body, max_deliveries=3)


async def test_unserializable_result_fails_without_retry(app: App) -> None:
    @app.task(name="bad_result", retries=3, backoff=0.01)
    async def bad_result() -> object:
        return object()

    async def body() -> None:
        h = await bad_result.submit()
        with pytest.raises(SerializationError, match="cannot JSON-serialize"):
            await h.result(timeout=5)
        assert (await h.record()).attempt == 1

    await _with_worker(app, body)
    del app.tasks[bad_result.key]


async def test_timeout_error_says_what_timed_out(app: App) -> None:
    async def body() -> None:
        h = await wa.sleepy.submit(2.0)
        with pytest.raises(TimeoutError, match=r"attempt 1 timed out after 0\.2 s"):
            await h.result(timeout=5)

    await _with_worker(app, body)


async def test_a_cancelled_worker_hands_back_outcomes_it_could_not_record(app: App) -> None:
    """Cancelled from outside (not stopped) while its outcome is being recorded: the
    entry goes back at once, not after its visibility timeout."""
    broker = app.broker
    recording = anyio.Event()

    async def finish_that_hangs(outcomes: Any) -> None:  # a broker that stopped answering
        recording.set()
        await anyio.sleep_forever()

    worker = Worker(app, handle_signals=False, poll_wait=0.05, visibility_timeout=30)
    handle = await wa.add.submit(2, 3)
    real_finish = broker.finish
    broker.finish = finish_that_hangs  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                await recording.wait()
            tg.cancel_scope.cancel()
    finally:
        broker.finish = real_finish  # type: ignore[method-assign]
    assert worker.stats.released == 1
    record = await broker.get(handle.invocation_id)
    assert record is not None
    assert (record.status, record.attempt) == (InvocationStatus.PENDING, 0)
    again = await broker.receive(["default"], 10, consumer="next", visibility_timeout=30, wait=0)
    assert [d.invocation_id for d in again] == [handle.invocation_id]


@pytest.mark.redis
async def test_a_released_entry_is_not_extended_by_the_heartbeat(redis_url: str) -> None:
    """A Redis receipt stays current after a release: a heartbeat between sending the
    release and its reply must not extend the entry (hidden again for a visibility
    timeout while its record says pending)."""
    wa.app.configure(broker=redis_url, store="memory://")
    async with wa.app:
        broker = wa.app.broker
        real_release = broker.release

        async def release_with_a_slow_reply(deliveries: Any) -> None:
            await real_release(deliveries)
            await anyio.sleep(1.2)  # the reply is slow: the heartbeat (0.5 s) runs meanwhile

        broker.release = release_with_a_slow_reply  # type: ignore[method-assign]
        worker = Worker(
            wa.app,
            handle_signals=False,
            poll_wait=0.05,
            visibility_timeout=1.5,
            grace_period=0.1,
            prefetch=0,
        )
        handle = await wa.slow_square.submit(3, 30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                while worker.stats.received < 1:
                    await anyio.sleep(0.01)
            worker.stop()
        broker.release = real_release  # type: ignore[method-assign]
        assert worker.stats.released == 1
        assert await handle.status() is InvocationStatus.PENDING
        again = await broker.receive(["default"], 1, consumer="next", visibility_timeout=30, wait=0)
        assert [d.invocation_id for d in again] == [handle.invocation_id]
        await broker.ack(again[0])
