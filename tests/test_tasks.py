"""Apps, task registration, submission options and retry policy."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from helpers import CountingStore

from acall import (
    App,
    ConfigurationError,
    InvalidArgumentsError,
    InvocationStatus,
    ResultTimeoutError,
)
from acall.calls import ConcurrencyMode
from acall.hashing import REFERENCE_PREFIX
from acall.tasks import RetryPolicy


@pytest.fixture
async def app() -> AsyncIterator[App]:
    application = App("memory://", CountingStore())
    async with application:
        yield application


def test_bare_and_configured_decorators(app: App) -> None:
    @app.task
    async def plain(x: int) -> int:
        return x

    @app.task(name="renamed", retries=2, queue="q", timeout=5)
    def configured(x: int) -> int:
        return x * 2

    assert plain.key == "test_tasks.test_bare_and_configured_decorators.<locals>.plain"
    assert configured.key == "test_tasks.renamed"
    assert configured.options.retry.retries == 2
    assert configured.options.queue == "q"
    assert configured(21) == 42  # calling the task runs the function locally
    assert app.get_task("test_tasks.renamed") is configured


def test_control_keyword_names_are_reserved(app: App) -> None:
    with pytest.raises(ConfigurationError, match="_queue"):

        @app.task
        async def bad(_queue: str) -> None: ...


def test_keys_concurrency_needs_key_arguments(app: App) -> None:
    with pytest.raises(ConfigurationError, match="key_arguments"):

        @app.task(concurrency="keys")
        async def bad(x: int) -> None: ...


def test_a_different_function_cannot_take_a_registered_key(app: App) -> None:
    @app.task(name="same")
    async def one() -> None: ...

    with pytest.raises(ConfigurationError, match="already registered"):

        @app.task(name="same")
        async def two() -> None: ...


async def test_submit_stores_a_pending_record(app: App) -> None:
    @app.task(queue="fast", timeout=3)
    async def job(a: int, b: str = "x") -> None: ...

    handle = await job.submit(1, _delay=60)
    record = await handle.record()
    assert record.status is InvocationStatus.PENDING
    assert record.queue == "fast"
    assert record.timeout == 3
    assert record.not_before is not None
    assert record.call.serialized_arguments == {"a": "1", "b": '"x"'}
    assert record.call_id.key == f"{job.key}:{record.call_id.args_id}"
    other = await job.submit(2, _queue="slow", _timeout=9)
    record = await other.record()
    assert (record.queue, record.timeout) == ("slow", 9)


async def test_submit_many_shares_common_arguments(app: App) -> None:
    store = app.store
    assert isinstance(store, CountingStore)

    @app.task
    async def job(table: dict[str, int], key: str) -> int:
        return table[key]

    table = {f"k{i}": i for i in range(5000)}
    handles = await job.submit_many(
        [{"key": f"k{i}"} for i in range(120)], common_args={"table": table}
    )
    assert len(handles) == 120
    assert store.calls["put"] == 1
    records = [await h.record() for h in handles]
    refs = {r.call.serialized_arguments["table"] for r in records}
    assert len(refs) == 1
    assert next(iter(refs)).startswith(REFERENCE_PREFIX)
    assert len({r.invocation_id for r in records}) == 120


async def test_concurrent_submitters_are_deduplicated(app: App) -> None:
    @app.task(concurrency=ConcurrencyMode.KEYS, key_arguments=["user"])
    async def job(user: int, note: str) -> None: ...

    handles: list[Any] = []

    async def submit(i: int) -> None:
        handles.append(await job.submit(7, f"note {i}"))

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(submit, i)
    assert len({h.invocation_id for h in handles}) == 1
    assert sum(not h.deduplicated for h in handles) == 1
    other = await job.submit(8, "x")
    assert other.invocation_id != handles[0].invocation_id


async def test_task_concurrency_allows_one_per_task(app: App) -> None:
    @app.task(concurrency=ConcurrencyMode.TASK)
    async def job(x: int) -> None: ...

    first = await job.submit(1)
    second = await job.submit(2)
    assert second.deduplicated
    assert second.invocation_id == first.invocation_id


@pytest.mark.parametrize(
    ("mode", "distinct"),
    [
        (ConcurrencyMode.DISABLED, 6),  # every call its own invocation
        (ConcurrencyMode.TASK, 1),  # one per task
        (ConcurrencyMode.ARGUMENTS, 3),  # one per distinct set of arguments
        (ConcurrencyMode.KEYS, 2),  # one per distinct key argument
    ],
)
async def test_submit_many_keys_each_mode(app: App, mode: ConcurrencyMode, distinct: int) -> None:
    options: dict[str, Any] = {"key_arguments": ["user"]} if mode is ConcurrencyMode.KEYS else {}

    @app.task(concurrency=mode, **options)
    async def job(user: int, note: str) -> None: ...

    pairs = [(1, "a"), (1, "a"), (1, "b"), (2, "c"), (1, "a"), (2, "c")]
    params = [{"user": u, "note": n} for u, n in pairs]
    handles = await job.submit_many(params)
    assert len(handles) == 6
    assert len({h.invocation_id for h in handles}) == distinct
    records = [await h.record() for h in handles]
    expected_task_key = f"{job.key}:*" if mode is ConcurrencyMode.TASK else None
    if mode in (ConcurrencyMode.DISABLED, ConcurrencyMode.TASK):
        assert {r.dedup_key for r in records} == {expected_task_key}
    else:
        assert all(r.dedup_key is not None and r.dedup_key.startswith(job.key) for r in records)


async def test_a_negative_delay_is_refused_before_anything_is_enqueued(app: App) -> None:
    @app.task
    async def job(x: int) -> None: ...

    with pytest.raises(InvalidArgumentsError, match="_delay must be >= 0"):
        await job.submit(1, _delay=-1)
    with pytest.raises(InvalidArgumentsError, match="_delay must be >= 0"):
        await job.submit_many([{"x": 1}, {"x": 2}], _delay=-0.5)
    counts = await app.broker.counts()
    assert sum(counts.values()) == 0


def test_retry_policy() -> None:
    random.seed(5)
    policy = RetryPolicy(retries=3, backoff=1.0, backoff_max=3.0, jitter=0.25, retry_on=(KeyError,))
    delays = [policy.delay(n) for n in (1, 2, 3, 4)]
    assert 0.75 <= delays[0] <= 1.25
    assert 1.5 <= delays[1] <= 2.5
    assert 2.25 <= delays[2] <= 3.75  # capped at 3, then jittered
    assert policy.should_retry(KeyError("x"), 3)
    assert not policy.should_retry(KeyError("x"), 4)
    assert not policy.should_retry(ValueError("x"), 1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(jitter=2)


async def test_exceptions_in_the_app_block_are_not_wrapped() -> None:
    application = App("memory://")
    with pytest.raises(KeyError):
        async with application:
            raise KeyError("plain")


def test_store_defaults_to_the_broker_url_with_the_options_both_take(tmp_path: Any) -> None:
    app = App(f"sqlite:///{tmp_path}/x.db?record_ttl=60")
    assert app.store.url == f"sqlite:///{tmp_path}/x.db"
    # Connection and TLS settings reach the store too (a rediss:// server with its own
    # CA would refuse a store without them); the broker's prefix and record_ttl do not.
    app = App(
        "rediss://127.0.0.1:6399/3?prefix=jobs:&record_ttl=60&socket_timeout=7"
        "&ssl_ca_certs=/etc/ca.pem&retries=2&max_connections=9"
    )
    store = app.store
    assert store.url.startswith("rediss://127.0.0.1:6399/3?")
    assert store.prefix == "acall:data:"  # type: ignore[attr-defined]
    for shared in ("socket_timeout=7", "ssl_ca_certs=", "retries=2", "max_connections=9"):
        assert shared in store.url, (shared, store.url)
    assert "record_ttl" not in store.url
    assert "prefix" not in store.url


def test_a_bad_broker_option_is_named_as_a_broker_option(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"record_ttl.* in broker URL"):
        App(f"sqlite:///{tmp_path}/x.db?record_ttl=abc")


async def test_a_broker_object_needs_an_explicit_store(tmp_path: Any) -> None:
    from acall.brokers import open_broker

    broker = open_broker(f"sqlite:///{tmp_path}/y.db")
    with pytest.raises(ConfigurationError, match="pass store="):
        App(broker)
    await broker.close()
    assert App(open_broker("memory://")).store.url == "memory://"


async def test_waiters_survive_a_cancelled_leader(app: App) -> None:
    """A leader that times out hands the watch over; the others still get results."""
    from acall.worker import Worker

    @app.task
    async def nap(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    worker = Worker(app, handle_signals=False, poll_wait=0.05, concurrency=8)
    results: list[float] = []

    async def wait_for(seconds: float, timeout: float | None) -> None:
        handle = await nap.submit(seconds)
        try:
            results.append(await handle.result(timeout=timeout))
        except ResultTimeoutError:
            results.append(-1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with anyio.create_task_group() as waiters:
            waiters.start_soon(wait_for, 0.5, 0.05)  # the first leader gives up early
            await anyio.sleep(0.01)
            for s in (0.1, 0.2, 0.3):
                waiters.start_soon(wait_for, s, 10)
        worker.stop()
    assert sorted(results) == [-1, 0.1, 0.2, 0.3]


async def test_many_waiters_on_one_invocation(app: App) -> None:
    """Waiters of one invocation form a chain: those that leave (a timeout, a
    cancellation), first, middle or last, do not cut the others off their result."""
    from acall.worker import Worker

    gate = anyio.Event()

    @app.task
    async def gated(x: int) -> int:
        await gate.wait()
        return x * 2

    handle = await gated.submit(21)
    results: list[object] = []

    async def wait(timeout: float | None) -> None:
        try:
            results.append(await handle.result(timeout=timeout))
        except ResultTimeoutError:
            results.append("timeout")

    worker = Worker(app, handle_signals=False, poll_wait=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with anyio.create_task_group() as waiters:
            waiters.start_soon(wait, None)
            waiters.start_soon(wait, 0.05)
            async with anyio.create_task_group() as cancelled:
                cancelled.start_soon(wait, None)
                await anyio.sleep(0.01)
                for timeout in (None, 0.1, None):
                    waiters.start_soon(wait, timeout)
                await anyio.sleep(0.01)
                cancelled.cancel_scope.cancel()  # leaves from the middle of the chain
            await anyio.sleep(0.2)  # both timeouts have passed
            assert results == ["timeout", "timeout"]
            gate.set()
        worker.stop()
    assert results == ["timeout", "timeout", 42, 42, 42]
    assert not app._results._waiting  # every waiter left the chain


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_concurrent_submitters_dedup_on_real_backends(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """Concurrent submissions are batched into one broker call; dedup still holds in it."""
    url = (
        f"sqlite:///{tmp_path}/d.db"
        if backend == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    application = App(url)

    @application.task(concurrency=ConcurrencyMode.KEYS, key_arguments=["user"])
    async def job(user: int, note: str) -> None: ...

    handles: list[Any] = []

    async def submit(i: int) -> None:
        handles.append(await job.submit(i % 3, f"note {i}"))

    async with application, anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(submit, i)
    assert len({h.invocation_id for h in handles}) == 3
    assert sum(not h.deduplicated for h in handles) == 3
