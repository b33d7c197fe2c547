"""Brokers: one conformance suite over every backend, then backend-specific cases.

Everything is real: SQLite files in ``tmp_path``, ``redis-server`` processes, and
Python subprocesses racing each other on the same broker.
"""

from __future__ import annotations

import sqlite3
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from anyio.abc import ByteReceiveStream

from acall.brokers import (
    Broker,
    Delivery,
    MemoryBroker,
    RedisBroker,
    SqliteBroker,
    open_broker,
)
from acall.dto import CallDTO, InvocationRecord, InvocationStatus, new_invocation_id
from acall.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    InvalidKeyError,
)
from acall.hashing import compute_args_id
from acall.ids import CallId, TaskId
from acall.stores import SqliteStore
from acall.testing import RedisServer, free_port

ARGS = {"x": "1", "name": '"ada"'}
CALL = CallDTO(CallId(TaskId("tests.brokers", "work"), compute_args_id(ARGS)), ARGS)
PENDING = InvocationStatus.PENDING
SUCCESS = InvocationStatus.SUCCESS


def _record(**changes: Any) -> InvocationRecord:
    return attrs.evolve(InvocationRecord(invocation_id=new_invocation_id(), call=CALL), **changes)


async def _receive(
    broker: Broker,
    queues: list[str] | None = None,
    max_items: int = 10,
    *,
    consumer: str = "c1",
    visibility_timeout: float = 30.0,
    wait: float = 0.0,
) -> list[Delivery]:
    return await broker.receive(
        queues or ["default"],
        max_items,
        consumer=consumer,
        visibility_timeout=visibility_timeout,
        wait=wait,
    )


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Re-run *check* until it is true; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await anyio.sleep(0.05)


class _FinalWatcher:
    """Collects what ``watch_final`` yields, in a background task."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.seen: set[str] = set()
        self.batches = 0
        self.ended = anyio.Event()

    async def run(self) -> None:
        try:
            async for ids in self.broker.watch_final():
                self.seen |= ids
                self.batches += 1
        finally:
            self.ended.set()


# -- the conformance suite over every backend -----------------------------------------------


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty broker (brokers opened on it share data), once per backend."""
    if request.param == "memory":
        name = f"conformance-{uuid.uuid4().hex}"
        yield f"memory://{name}"
        MemoryBroker.drop(name)
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        yield request.getfixturevalue("redis_url")


@pytest.fixture
async def broker(broker_url: str) -> Any:
    async with open_broker(broker_url) as opened:
        yield opened


async def test_submit_get_round_trip(broker: Broker) -> None:
    record = _record(max_retries=2, timeout=5.0, worker_id=None, dedup_key=None)
    assert await broker.submit(record) == record
    assert await broker.get(record.invocation_id) == record
    assert await broker.get(new_invocation_id()) is None


async def test_get_many_keeps_order_with_unknown_ids(broker: Broker) -> None:
    first, second = _record(), _record(queue="other")
    await broker.submit_many([first, second])
    unknown = new_invocation_id()
    got = await broker.get_many([second.invocation_id, unknown, first.invocation_id])
    assert got == [second, None, first]
    assert await broker.get_many([first.invocation_id, first.invocation_id]) == [first, first]
    assert await broker.get_many([]) == []


async def test_resubmitting_an_id_changes_nothing(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    again = attrs.evolve(record, queue="elsewhere", attempt=7)
    assert await broker.submit(again) == record
    assert await broker.pending_count("default") == 1
    assert await broker.pending_count("elsewhere") == 0


async def test_receive_in_submission_order_per_queue(broker: Broker) -> None:
    records = [_record() for _ in range(5)]
    for record in records:
        await broker.submit(record)
    got = await _receive(broker)
    assert [d.invocation_id for d in got] == [r.invocation_id for r in records]
    assert all(d.queue == "default" and d.delivery_count == 1 for d in got)
    assert len({d.receipt for d in got}) == 5, "receipts are unique per delivery"


async def test_receive_from_several_queues_keeps_each_queue_in_order(broker: Broker) -> None:
    a1, b1, a2, b2 = _record(queue="a"), _record(queue="b"), _record(queue="a"), _record(queue="b")
    await broker.submit_many([a1, b1, a2, b2])
    got = await _receive(broker, ["a", "b"])
    assert len({d.receipt for d in got}) == 4
    by_queue = {q: [d.invocation_id for d in got if d.queue == q] for q in ("a", "b")}
    assert by_queue == {
        "a": [a1.invocation_id, a2.invocation_id],
        "b": [b1.invocation_id, b2.invocation_id],
    }


async def test_max_items_is_respected(broker: Broker) -> None:
    records = [_record(queue=("a", "b")[i % 2]) for i in range(7)]
    await broker.submit_many(records)
    first = await _receive(broker, ["a", "b"], 3)
    assert len(first) == 3
    second = await _receive(broker, ["a", "b"], 3)
    assert len(second) == 3
    third = await _receive(broker, ["a", "b"], 3)
    assert len(third) == 1
    received = {d.invocation_id for d in first + second + third}
    assert received == {r.invocation_id for r in records}


async def test_concurrent_consumers_never_share_an_entry(broker_url: str) -> None:
    records = [_record() for _ in range(60)]
    taken: list[str] = []
    async with open_broker(broker_url) as client, open_broker(broker_url) as worker:
        await client.submit_many(records)

        async def consume(consumer: str) -> None:
            while got := await _receive(worker, max_items=4, consumer=consumer):
                taken.extend(d.invocation_id for d in got)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(consume, f"c{i}")
    assert sorted(taken) == sorted(r.invocation_id for r in records)


async def test_queues_are_isolated(broker: Broker) -> None:
    one, two = _record(queue="one"), _record(queue="two")
    await broker.submit_many([one, two])
    got = await _receive(broker, ["one"])
    assert [d.invocation_id for d in got] == [one.invocation_id]
    assert await _receive(broker, ["one", "three"]) == []
    assert await broker.pending_count("two") == 1
    assert [d.invocation_id for d in await _receive(broker, ["two"])] == [two.invocation_id]


async def test_wait_returns_early_when_an_entry_arrives(broker: Broker) -> None:
    record = _record()
    got: list[Delivery] = []

    async def consume() -> None:
        got.extend(await _receive(broker, wait=5.0))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.2)
        await broker.submit(record)
    elapsed = time.monotonic() - started
    assert [d.invocation_id for d in got] == [record.invocation_id]
    assert elapsed < 1.5, f"receive returned {elapsed:.2f} s after it started"


async def test_wait_returns_empty_after_the_wait(broker: Broker) -> None:
    started = time.monotonic()
    assert await _receive(broker, wait=0.3) == []
    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed < 2.0
    started = time.monotonic()
    assert await _receive(broker, wait=0) == []
    assert time.monotonic() - started < 1.0


async def test_visibility_timeout_redelivers_to_another_consumer(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    (first,) = await _receive(broker, consumer="c1", visibility_timeout=0.3)
    assert await _receive(broker, consumer="c2") == []
    await anyio.sleep(0.4)
    (second,) = await _receive(broker, consumer="c2", visibility_timeout=30)
    assert second.invocation_id == record.invocation_id
    assert second.delivery_count == 2
    assert second.receipt != first.receipt
    assert await _receive(broker, consumer="c3") == []


async def test_extend_prevents_redelivery(broker: Broker) -> None:
    await broker.submit(_record())
    deliveries = await _receive(broker, consumer="c1", visibility_timeout=0.3)
    for _ in range(4):  # 0.6 s in all: twice the original timeout
        await anyio.sleep(0.15)
        await broker.extend(deliveries, 0.3)
        assert await _receive(broker, consumer="c2") == []
    # A longer timeout asked for by extend() holds too, whatever the next consumer asks.
    await broker.extend(deliveries, 5.0)
    await anyio.sleep(0.4)
    assert await _receive(broker, consumer="c2", visibility_timeout=0.1) == []
    await broker.extend(deliveries, 0.1)
    await anyio.sleep(0.3)
    (again,) = await _receive(broker, consumer="c2")
    assert again.delivery_count == 2


async def test_ack_prevents_redelivery(broker: Broker) -> None:
    await broker.submit(_record())
    (delivery,) = await _receive(broker, visibility_timeout=0.2)
    await broker.ack(delivery)
    await broker.ack(delivery)  # a second ack is harmless
    await anyio.sleep(0.3)
    assert await _receive(broker, consumer="c2") == []
    assert await broker.pending_count("default") == 0


async def test_stale_receipt_is_a_no_op(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    (stale,) = await _receive(broker, consumer="c1", visibility_timeout=0.2)
    await anyio.sleep(0.3)
    (current,) = await _receive(broker, consumer="c2", visibility_timeout=30)
    # The first consumer woke up late: nothing it does touches the new delivery.
    await broker.ack(stale)
    await broker.extend([stale], 30)
    await broker.release([stale])
    retrying = attrs.evolve(record, status=InvocationStatus.RETRYING, attempt=1)
    await broker.retry(stale, retrying, 0)
    assert await broker.get(record.invocation_id) == record
    assert await broker.pending_count("default") == 1
    assert await _receive(broker, consumer="c3") == []
    forged = attrs.evolve(current, receipt="not-a-receipt")
    await broker.ack(forged)
    assert await broker.pending_count("default") == 1
    await broker.ack(current)
    assert await broker.pending_count("default") == 0


async def test_release_makes_entries_deliverable_at_once_in_place(broker: Broker) -> None:
    first, second = _record(), _record()
    await broker.submit_many([first, second])
    taken = await _receive(broker, max_items=1, consumer="c1", visibility_timeout=30)
    assert [d.invocation_id for d in taken] == [first.invocation_id]
    await broker.release(taken)
    again = await _receive(broker, consumer="c2")
    assert [d.invocation_id for d in again] == [first.invocation_id, second.invocation_id]
    assert [d.delivery_count for d in again] == [2, 1]


async def test_release_wakes_a_waiting_consumer(broker: Broker) -> None:
    await broker.submit(_record())
    taken = await _receive(broker, consumer="c1")
    got: list[Delivery] = []

    async def consume() -> None:
        got.extend(await _receive(broker, consumer="c2", wait=5.0))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.1)
        await broker.release(taken)
    assert len(got) == 1
    assert time.monotonic() - started < 2.0


async def test_retry_with_delay(broker: Broker) -> None:
    record = _record(max_retries=3)
    await broker.submit(record)
    (delivery,) = await _receive(broker, consumer="c1")
    retrying = attrs.evolve(
        record, status=InvocationStatus.RETRYING, attempt=1, not_before=time.time() + 0.5
    )
    retried_at = time.monotonic()
    await broker.retry(delivery, retrying, 0.5)
    assert await broker.get(record.invocation_id) == retrying
    assert await _receive(broker, consumer="c2") == []
    assert await broker.pending_count("default") == 1
    (again,) = await _receive(broker, consumer="c2", wait=5.0)
    waited = time.monotonic() - retried_at
    assert 0.4 <= waited < 2.5, f"redelivered after {waited:.2f} s"
    assert again.invocation_id == record.invocation_id
    assert again.delivery_count == 1, "a retry is a new entry"
    await broker.ack(again)
    assert await broker.pending_count("default") == 0


async def test_retry_without_delay_goes_to_the_back(broker: Broker) -> None:
    first, second = _record(), _record()
    await broker.submit_many([first, second])
    (delivery,) = await _receive(broker, max_items=1)
    await broker.retry(delivery, attrs.evolve(first, status=InvocationStatus.RETRYING), 0)
    again = await _receive(broker, consumer="c2")
    assert [d.invocation_id for d in again] == [second.invocation_id, first.invocation_id]


async def test_not_before_in_the_future(broker: Broker) -> None:
    later = _record(not_before=time.time() + 0.5)
    now = _record(not_before=time.time() - 10)
    submitted_at = time.monotonic()
    await broker.submit_many([later, now])
    got = await _receive(broker)
    assert [d.invocation_id for d in got] == [now.invocation_id]
    assert await broker.pending_count("default") == 2
    (delayed,) = await _receive(broker, wait=5.0)
    assert delayed.invocation_id == later.invocation_id
    assert time.monotonic() - submitted_at >= 0.4


async def test_dedup_while_pending_then_after_success(broker: Broker) -> None:
    first = _record(dedup_key="tests.brokers.work:abc")
    assert await broker.submit(first) == first
    duplicate = _record(dedup_key="tests.brokers.work:abc")
    assert await broker.submit(duplicate) == first
    assert await broker.get(duplicate.invocation_id) is None
    assert await broker.pending_count("default") == 1
    running = attrs.evolve(first, status=InvocationStatus.RUNNING, attempt=1)
    await broker.update(running)
    assert await broker.submit(duplicate) == running, "RUNNING still holds the key"
    await broker.update(attrs.evolve(running, status=SUCCESS, result='"ok"'))
    assert await broker.submit(duplicate) == duplicate
    assert await broker.get(duplicate.invocation_id) == duplicate
    other = _record(dedup_key="another key")
    assert await broker.submit(other) == other


async def test_concurrent_dedup_race_stores_exactly_one(broker: Broker) -> None:
    records = [_record(dedup_key="race:*") for _ in range(20)]
    results: list[InvocationRecord] = []

    async def submit(record: InvocationRecord) -> None:
        results.append(await broker.submit(record))

    async with anyio.create_task_group() as tg:
        for record in records:
            tg.start_soon(submit, record)
    winners = {result.invocation_id for result in results}
    assert len(results) == 20
    assert len(winners) == 1
    stored = await broker.get_many([r.invocation_id for r in records])
    assert sum(record is not None for record in stored) == 1
    assert (await broker.counts())[PENDING] == 1
    assert await broker.pending_count("default") == 1


async def test_submit_many_with_new_and_duplicate_records(broker: Broker) -> None:
    existing = _record(dedup_key="k1")
    await broker.submit(existing)
    fresh_k1, first_k2, plain, second_k2 = (
        _record(dedup_key="k1"),
        _record(dedup_key="k2"),
        _record(),
        _record(dedup_key="k2"),
    )
    result = await broker.submit_many([fresh_k1, first_k2, plain, second_k2])
    assert result == [existing, first_k2, plain, first_k2]
    assert await broker.pending_count("default") == 3
    assert await broker.submit_many([]) == []


async def test_update_final_is_reported_by_watch_final(broker: Broker) -> None:
    done, running = _record(), _record()
    await broker.submit_many([done, running])
    watcher = _FinalWatcher(broker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        await anyio.sleep(0.2)  # let the watcher subscribe
        await broker.update(attrs.evolve(running, status=InvocationStatus.RUNNING))
        finished = attrs.evolve(done, status=SUCCESS, result='"ok"')
        await broker.update(finished)

        async def seen() -> bool:
            return done.invocation_id in watcher.seen

        await _until(seen, 3.0, "watch_final reporting the finished invocation")
        assert running.invocation_id not in watcher.seen
        assert await broker.get(done.invocation_id) == finished
        tg.cancel_scope.cancel()


async def test_watch_final_ends_when_the_broker_closes(broker_url: str) -> None:
    broker = open_broker(broker_url)
    watcher = _FinalWatcher(broker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        await anyio.sleep(0.2)
        await broker.close()
        with anyio.fail_after(3):
            await watcher.ended.wait()


async def test_update_of_an_unknown_invocation_fails(broker: Broker) -> None:
    with pytest.raises(BrokerError, match="not there"):
        await broker.update(_record(status=SUCCESS))


async def test_counts_by_status(broker: Broker) -> None:
    records = [_record() for _ in range(6)]
    await broker.submit_many(records)
    statuses = [
        InvocationStatus.RUNNING,
        InvocationStatus.RUNNING,
        InvocationStatus.RETRYING,
        SUCCESS,
        InvocationStatus.FAILED,
    ]
    for record, status in zip(records, statuses, strict=False):
        await broker.update(attrs.evolve(record, status=status))
    assert await broker.counts() == {
        PENDING: 1,
        InvocationStatus.RUNNING: 2,
        InvocationStatus.RETRYING: 1,
        SUCCESS: 1,
        InvocationStatus.FAILED: 1,
    }


async def test_pending_count(broker: Broker) -> None:
    assert await broker.pending_count("default") == 0
    await broker.submit_many([_record() for _ in range(3)])
    await broker.submit(_record(not_before=time.time() + 60))
    await broker.submit(_record(queue="other"))
    (in_flight,) = await _receive(broker, max_items=1)
    assert await broker.pending_count("default") == 4, "deliverable, delayed and in flight"
    await broker.ack(in_flight)
    assert await broker.pending_count("default") == 3
    assert await broker.pending_count("other") == 1


async def test_invalid_input_is_rejected_before_the_backend(broker: Broker) -> None:
    for bad_id in ("../x", "", "a b", "k" * 257, 42):
        with pytest.raises(InvalidKeyError):
            await broker.get(bad_id)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        await broker.get_many("abc")
    with pytest.raises(InvalidKeyError):
        await broker.submit(_record(queue="no spaces"))
    with pytest.raises(InvalidKeyError):
        await broker.submit(_record(dedup_key=""))
    with pytest.raises(TypeError):
        await broker.submit("not a record")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="final"):
        await broker.submit(_record(status=SUCCESS))
    with pytest.raises(InvalidKeyError):
        await _receive(broker, ["bad queue"])
    with pytest.raises(InvalidKeyError):
        await broker.pending_count("bad/queue")
    for bad in ({"max_items": 0}, {"visibility_timeout": 0}, {"wait": -1}):
        with pytest.raises(ConfigurationError):
            await _receive(broker, **bad)  # type: ignore[arg-type]
    record = _record()
    await broker.submit(record)
    (delivery,) = await _receive(broker)
    with pytest.raises(ValueError, match="delivery is for"):
        await broker.retry(delivery, _record(status=InvocationStatus.RETRYING), 1)
    with pytest.raises(ValueError, match="final"):
        await broker.retry(delivery, attrs.evolve(record, status=SUCCESS), 1)
    assert await broker.counts() == {s: int(s is PENDING) for s in InvocationStatus}


async def test_close_is_idempotent_and_final(broker_url: str) -> None:
    record = _record()
    async with open_broker(broker_url) as broker:
        await broker.submit(record)
    assert broker.closed  # type: ignore[attr-defined]
    await broker.close()
    assert "closed" in repr(broker)
    with pytest.raises(BrokerError, match="closed"):
        await broker.get(record.invocation_id)
    with pytest.raises(BrokerError, match="closed"):
        await _receive(broker)
    async with open_broker(broker_url) as reopened:
        assert await reopened.get(record.invocation_id) == record


# -- cross-process deduplication ------------------------------------------------------------

_CHILD_SUBMITTER = textwrap.dedent(
    """
    import asyncio, sys
    from acall.brokers import open_broker
    from acall.dto import CallDTO, InvocationRecord, new_invocation_id
    from acall.hashing import compute_args_id
    from acall.ids import CallId, TaskId

    async def main(url: str, key: str) -> None:
        args = {"x": "1"}
        call = CallDTO(CallId(TaskId("tests.brokers", "work"), compute_args_id(args)), args)
        async with open_broker(url) as broker:
            await broker.pending_count("default")  # connected, schema ready
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            record = InvocationRecord(new_invocation_id(), call, dedup_key=key)
            stored = await broker.submit(record)
            print("stored", stored.invocation_id, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def _read_until(stream: ByteReceiveStream, expected: bytes) -> bytes:
    seen = b""
    while expected not in seen:
        try:
            seen += await stream.receive()
        except anyio.EndOfStream:
            break
    return seen


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A broker URL several processes can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("redis_url")
    return url


async def test_cross_process_dedup_race_stores_exactly_one(shared_url: str) -> None:
    key = "tests.brokers.work:cross-process"
    cmd = [sys.executable, "-c", _CHILD_SUBMITTER, shared_url, key]
    async with open_broker(shared_url) as broker:
        await broker.pending_count("default")
        with anyio.fail_after(30):
            children = [await anyio.open_process(cmd) for _ in range(4)]
            try:
                outputs = []
                for child in children:
                    assert child.stdout is not None
                    outputs.append(await _read_until(child.stdout, b"ready"))
                for child in children:
                    assert child.stdin is not None
                    await child.stdin.send(b"go\n")
                for i, child in enumerate(children):
                    assert child.stdout is not None
                    outputs[i] += await _read_until(child.stdout, b"\x00never")
                    if await child.wait() != 0:
                        assert child.stderr is not None
                        error = await _read_until(child.stderr, b"\x00never")
                        pytest.fail(f"child failed: {error.decode()}")
            finally:
                for child in children:
                    await child.aclose()
        ids = {out.decode().split("stored ")[1].strip() for out in outputs}
        assert len(ids) == 1, f"children got different invocations: {ids}"
        assert (await broker.counts())[PENDING] == 1
        assert await broker.pending_count("default") == 1
        (delivery,) = await _receive(broker)
        assert delivery.invocation_id in ids


# -- open_broker ----------------------------------------------------------------------------


async def test_memory_urls_fresh_and_named() -> None:
    async with open_broker("memory://") as a, open_broker("memory://") as b:
        record = _record()
        await a.submit(record)
        assert await b.get(record.invocation_id) is None
    name = f"named-{uuid.uuid4().hex}"
    async with open_broker(f"memory://{name}") as a:
        await a.submit(record)
    async with open_broker(f"memory://{name}?record_ttl=30") as b:
        assert isinstance(b, MemoryBroker)
        assert (b.url, b.name, b.record_ttl) == (f"memory://{name}", name, 30.0)
        assert await b.get(record.invocation_id) == record
    assert MemoryBroker.drop(name) is True
    assert MemoryBroker.drop(name) is False
    with pytest.raises(ConfigurationError, match="memory://name"):
        open_broker("memory://a/b")


async def test_sqlite_relative_and_absolute_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_broker("sqlite:///relative.db") as broker:
        assert isinstance(broker, SqliteBroker)
        assert broker.url == "sqlite:///relative.db"
        await broker.submit(_record())
    assert (tmp_path / "relative.db").is_file()
    absolute = tmp_path / "sub" / "absolute.db"
    absolute.parent.mkdir()
    url = f"sqlite:///{absolute}"
    assert url.startswith("sqlite:////")
    async with open_broker(url + "?lock_timeout=2.5&max_threads=2&record_ttl=60") as broker:
        assert isinstance(broker, SqliteBroker)
        assert (broker.path, broker.lock_timeout, broker.record_ttl) == (str(absolute), 2.5, 60)
        await broker.submit(_record())
    assert absolute.is_file()


def test_redis_url_options() -> None:
    broker = open_broker("redis://127.0.0.1:6390/3?prefix=app:&record_ttl=60")
    assert isinstance(broker, RedisBroker)
    assert (broker.prefix, broker.record_ttl, broker.port, broker.db) == ("app:", 60.0, 6390, 3)
    default = open_broker("rediss://h", record_ttl=None)
    assert isinstance(default, RedisBroker)
    assert (default.prefix, default.record_ttl) == ("acall:", None)
    assert open_broker("redis://h").record_ttl == 7 * 24 * 3600  # type: ignore[attr-defined]


def test_bad_urls_are_configuration_errors() -> None:
    for url in ("nothing", "amqp://user:s3cret@host/", "sqlite://relative.db", "sqlite:///"):
        with pytest.raises(ConfigurationError) as caught:
            open_broker(url)
        assert "s3cret" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="accepted forms"):
        open_broker("amqp://host")
    with pytest.raises(ConfigurationError, match="unknown option 'ttl'"):
        open_broker("memory://?ttl=5")
    with pytest.raises(ConfigurationError, match="unknown option"):
        open_broker("sqlite:///x.db", prefix="p:")
    with pytest.raises(ConfigurationError, match="record_ttl"):
        open_broker("memory://", record_ttl=0)
    with pytest.raises(ConfigurationError):
        open_broker(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as caught:
        open_broker("redis://user:s3cret@127.0.0.1:notaport/0")
    assert "s3cret" not in str(caught.value)
    broker = open_broker("redis://user:s3cret@127.0.0.1:6379/0")
    assert broker.url == "redis://user:***@127.0.0.1:6379/0"
    assert "s3cret" not in repr(broker)


# -- memory ---------------------------------------------------------------------------------


async def test_memory_finished_records_expire_after_record_ttl() -> None:
    async with MemoryBroker(record_ttl=0.1) as broker:
        done, pending = _record(), _record()
        await broker.submit_many([done, pending])
        await broker.update(attrs.evolve(done, status=SUCCESS))
        await anyio.sleep(0.2)
        assert await broker.get_many([done.invocation_id, pending.invocation_id]) == [
            None,
            pending,
        ]
        assert (await broker.counts())[SUCCESS] == 0


# -- sqlite ---------------------------------------------------------------------------------

_CHILD_LOCKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
    conn.close()
    """
)


async def test_sqlite_shared_by_two_broker_instances(tmp_path: Path) -> None:
    path = tmp_path / "two.db"
    async with SqliteBroker(path) as client, SqliteBroker(path) as worker:
        watcher = _FinalWatcher(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            record = _record(dedup_key="shared")
            got: list[Delivery] = []
            received = anyio.Event()

            async def consume() -> None:
                got.extend(await _receive(worker, wait=5.0))
                received.set()

            tg.start_soon(consume)
            await anyio.sleep(0.1)
            await client.submit(record)
            with anyio.fail_after(3):
                await received.wait()
            assert await worker.submit(_record(dedup_key="shared")) == record
            (delivery,) = got
            await worker.update(attrs.evolve(record, status=SUCCESS, result='"done"'))
            await worker.ack(delivery)

            async def seen() -> bool:
                return record.invocation_id in watcher.seen

            await _until(seen, 3.0, "the client seeing the worker's result")
            stored = await client.get(record.invocation_id)
            assert stored is not None
            assert stored.result == '"done"'
            assert await client.pending_count("default") == 0
            tg.cancel_scope.cancel()


async def test_sqlite_file_shared_with_a_store(tmp_path: Path) -> None:
    path = tmp_path / "both.db"
    async with SqliteBroker(path) as broker, SqliteStore(path) as store:
        record = _record()
        await broker.submit(record)
        await store.put("blob", b"value")
        assert await broker.get(record.invocation_id) == record
        assert await store.get("blob") == b"value"
    conn = sqlite3.connect(path)
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"acall_invocations", "acall_dedup", "acall_counters", "acall_blobs"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_sqlite_waits_for_a_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    async with (
        SqliteBroker(path) as patient,
        SqliteBroker(path, lock_timeout=0.3) as impatient,
    ):
        before = _record()
        await patient.submit(before)
        await impatient.pending_count("default")  # connected before the lock is taken
        cmd = [sys.executable, "-c", _CHILD_LOCKER, str(path), "1.5"]
        async with await anyio.open_process(cmd) as child:
            assert child.stdout is not None
            with anyio.fail_after(10):
                await _read_until(child.stdout, b"locked")
            locked_at = time.monotonic()
            assert await patient.get(before.invocation_id) == before  # WAL: reads go on
            with pytest.raises(BrokerUnavailableError, match="locked"):
                await impatient.submit(_record())
            assert time.monotonic() - locked_at < 1.4
            waited_for = _record()
            await patient.submit(waited_for)
            waited = time.monotonic() - locked_at
            assert await child.wait() == 0
        assert waited > 1.0, f"submit returned after {waited:.2f} s, before the lock was freed"
        assert await patient.pending_count("default") == 2


async def test_sqlite_never_blocks_the_event_loop(tmp_path: Path) -> None:
    records = [_record(dedup_key=f"k{i}") for i in range(3000)]
    async with SqliteBroker(tmp_path / "loop.db") as broker:
        await broker.pending_count("default")  # connection and schema set-up
        gaps: list[float] = []
        done = anyio.Event()

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await anyio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await anyio.sleep(0.01)
            await broker.submit_many(records)
            assert len(await broker.get_many([r.invocation_id for r in records])) == 3000
            assert len(await _receive(broker, max_items=3000)) == 3000
            done.set()
        assert len(gaps) > 5, "the calls finished too quickly to observe the loop"
        assert max(gaps) < 0.1, f"event loop blocked for {max(gaps) * 1000:.0f} ms"


async def test_sqlite_missing_directory_and_damaged_rows(tmp_path: Path) -> None:
    async with open_broker(f"sqlite:///{tmp_path}/no/such/dir/broker.db") as broker:
        with pytest.raises(ConfigurationError, match="does not exist"):
            await broker.submit(_record())
    path = tmp_path / "damaged.db"
    record = _record()
    async with SqliteBroker(path) as broker:
        await broker.submit(record)
        conn = sqlite3.connect(path)
        try:
            with conn:
                conn.execute("UPDATE acall_invocations SET record = '{\"v\": 1}'")
        finally:
            conn.close()
        with pytest.raises(BrokerError, match=f"record of invocation {record.invocation_id}"):
            await broker.get(record.invocation_id)


async def test_sqlite_finished_rows_are_purged_after_record_ttl(tmp_path: Path) -> None:
    path = tmp_path / "purge.db"
    old = _record()
    async with SqliteBroker(path, record_ttl=0.1) as broker:
        await broker.submit(old)
        await broker.update(attrs.evolve(old, status=SUCCESS))
    await anyio.sleep(0.2)
    async with SqliteBroker(path, record_ttl=0.1) as broker:
        new = _record()
        await broker.submit(new)
        # A broker's first final update purges expired rows.
        await broker.update(attrs.evolve(new, status=SUCCESS))
        assert await broker.get_many([old.invocation_id, new.invocation_id]) == [
            None,
            attrs.evolve(new, status=SUCCESS),
        ]


# -- redis ----------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_client_kill_between_operations_is_invisible(
    redis_url: str, redis_server: RedisServer
) -> None:
    def kill() -> None:
        killed = redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert isinstance(killed, int)

    async with open_broker(redis_url) as broker:
        record = _record(dedup_key="k")
        await broker.submit(record)
        kill()
        assert await broker.get(record.invocation_id) == record
        kill()
        (delivery,) = await _receive(broker)
        kill()
        await broker.extend([delivery], 30)
        kill()
        await broker.update(attrs.evolve(record, status=SUCCESS))
        kill()
        await broker.ack(delivery)
        kill()
        assert (await broker.counts())[SUCCESS] == 1
        kill()
        assert await broker.pending_count("default") == 0
        # A connection killed in the middle of a blocking receive.
        late = _record()
        got: list[Delivery] = []

        async def consume() -> None:
            got.extend(await _receive(broker, wait=5.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.2)
            kill()
            await anyio.sleep(0.1)
            await broker.submit(late)
        assert [d.invocation_id for d in got] == [late.invocation_id]


@pytest.mark.redis
async def test_redis_watch_final_survives_a_killed_subscription(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with open_broker(redis_url) as broker:
        watcher = _FinalWatcher(broker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await anyio.sleep(0.2)
            redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
            records = [_record() for _ in range(20)]
            await broker.submit_many(records)
            # Notifications sent while the subscription is re-established may be lost
            # (best effort); those sent after it must arrive.
            updated_at = time.monotonic()
            for record in records:
                await broker.update(attrs.evolve(record, status=SUCCESS))
                await anyio.sleep(0.1)
                if watcher.seen:
                    break
            assert watcher.seen <= {r.invocation_id for r in records}
            assert watcher.seen, "no notification arrived after the subscription was killed"
            assert time.monotonic() - updated_at < 1.5
            tg.cancel_scope.cancel()


@pytest.mark.redis
async def test_redis_server_down_is_broker_unavailable(redis_server: RedisServer) -> None:
    # A private server: stopping the session one would disturb other tests.
    with RedisServer(executable=redis_server.executable, databases=1) as server:
        async with open_broker(server.url_for(0)) as broker:
            record = _record()
            await broker.submit(record)
            await server.astop()
            started = time.monotonic()
            with anyio.fail_after(15), pytest.raises(BrokerUnavailableError) as caught:
                await broker.get(record.invocation_id)
            with anyio.fail_after(15), pytest.raises(BrokerUnavailableError):
                await _receive(broker, wait=1.0)
            assert time.monotonic() - started < 12
            assert f"127.0.0.1:{server.port}" in str(caught.value)
            # Back (empty: no persistence): the same broker reconnects.
            await server.astart()
            assert await broker.get(record.invocation_id) is None
            await broker.submit(record)
            assert [d.invocation_id for d in await _receive(broker)] == [record.invocation_id]


@pytest.mark.redis
async def test_redis_unreachable_port_fails_fast() -> None:
    async with open_broker(f"redis://:pw@127.0.0.1:{free_port()}/0", retries=1) as broker:
        with anyio.fail_after(10), pytest.raises(BrokerUnavailableError) as caught:
            await broker.pending_count("default")
    assert "redis://:***@127.0.0.1" in str(caught.value)


@pytest.mark.redis
async def test_redis_key_layout_and_record_ttl(redis_url: str, redis_server: RedisServer) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    async with open_broker(redis_url + "?prefix=t:&record_ttl=60") as broker:
        record = _record(dedup_key="key")
        await broker.submit(record)
        inv = f"t:inv:{record.invocation_id}"
        assert redis_server.command("PTTL", inv, db=db) == -1, "pending records never expire"
        assert redis_server.command("GET", "t:dedup:key", db=db) == record.invocation_id.encode()
        groups = redis_server.command("XINFO", "GROUPS", "t:q:default", db=db)
        assert isinstance(groups, list)
        assert b"acall-workers" in groups[0]  # type: ignore[operator]
        (delivery,) = await _receive(broker)
        await broker.update(attrs.evolve(record, status=SUCCESS))
        await broker.ack(delivery)
        pttl = redis_server.command("PTTL", inv, db=db)
        assert isinstance(pttl, int)
        assert 55_000 < pttl <= 60_000
        assert redis_server.command("EXISTS", "t:dedup:key", db=db) == 0
        assert redis_server.command("XLEN", "t:q:default", db=db) == 0


@pytest.mark.redis
async def test_redis_finished_records_expire(redis_url: str) -> None:
    async with open_broker(redis_url, record_ttl=0.2) as broker:
        done, pending = _record(), _record()
        await broker.submit_many([done, pending])
        await broker.update(attrs.evolve(done, status=SUCCESS))
        assert (await broker.counts())[SUCCESS] == 1
        await anyio.sleep(0.35)
        assert await broker.get_many([done.invocation_id, pending.invocation_id]) == [
            None,
            pending,
        ]
        assert await broker.counts() == {s: int(s is PENDING) for s in InvocationStatus}


@pytest.mark.redis
async def test_redis_prefixes_isolate_brokers(redis_url: str) -> None:
    async with (
        open_broker(redis_url, prefix="one:") as one,
        open_broker(redis_url, prefix="two:") as two,
    ):
        record = _record(dedup_key="same")
        await one.submit(record)
        other = _record(dedup_key="same")
        assert await two.submit(other) == other
        assert await two.get(record.invocation_id) is None
        assert [d.invocation_id for d in await _receive(two)] == [other.invocation_id]
        assert [d.invocation_id for d in await _receive(one)] == [record.invocation_id]
