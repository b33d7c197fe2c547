"""Brokers: one conformance suite over every backend, then backend-specific cases.

Everything is real: SQLite files in ``tmp_path``, ``redis-server`` processes, and
Python subprocesses racing each other on the same broker.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs
import pytest
from anyio.abc import ByteReceiveStream
from loop_watch import longest_gap

from acall.brokers import (
    Broker,
    DamagedRecord,
    Delivery,
    MemoryBroker,
    RedisBroker,
    SqliteBroker,
    open_broker,
)
from acall.dto import (
    RECORD_HEAD,
    CallDTO,
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
    new_invocation_id,
)
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

_T = TypeVar("_T")

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


async def test_scan_records_sees_every_record_in_bounded_batches(broker: Broker) -> None:
    records = [_record(queue="default" if i % 3 else "other") for i in range(1203)]
    await broker.submit_many(records)
    # Some are running and some finished: the scan sees each in its current state.
    deliveries = await _receive(broker, ["default"], 5)
    claimed = {record.invocation_id: record for record in records}
    await broker.finish(
        [(d, attrs.evolve(claimed[d.invocation_id], status=SUCCESS)) for d in deliveries[:2]]
    )
    seen: dict[str, InvocationRecord] = {}
    async for batch in broker.scan_records(batch_size=100):
        assert 0 < len(batch) <= 100
        for record in batch:
            assert isinstance(record, InvocationRecord)
            assert record.invocation_id not in seen, "each record once"
            seen[record.invocation_id] = record
    assert set(seen) == {record.invocation_id for record in records}
    for stored in await broker.get_many(list(seen)):
        assert stored is not None
        assert seen[stored.invocation_id] == stored
    statuses = [seen[d.invocation_id].status for d in deliveries]
    assert statuses == [SUCCESS, SUCCESS] + [InvocationStatus.RUNNING] * 3
    with pytest.raises(ConfigurationError, match="batch_size"):
        await anext(aiter(broker.scan_records(batch_size=0)))


async def test_get_many_keeps_order_with_unknown_ids(broker: Broker) -> None:
    first, second = _record(), _record(queue="other")
    await broker.submit_many([first, second])
    unknown = new_invocation_id()
    got = await broker.get_many([second.invocation_id, unknown, first.invocation_id])
    assert got == [second, None, first]
    assert await broker.get_many([first.invocation_id, first.invocation_id]) == [first, first]
    assert await broker.get_many([]) == []


async def test_get_final_many_gives_final_records_and_live_statuses(broker: Broker) -> None:
    pending, running, retrying, done = (_record() for _ in range(4))
    retrying = attrs.evolve(retrying, status=InvocationStatus.RETRYING, attempt=1)
    await broker.submit_many([pending, running, retrying, done])
    (delivery,) = await _receive(broker, max_items=1)  # `pending` is the first in line
    await broker.update(attrs.evolve(done, status=SUCCESS, attempt=1, result="42"))
    unknown = new_invocation_id()
    ids = [p.invocation_id for p in (pending, running, retrying, done)] + [unknown]
    got = await broker.get_final_many(ids)
    assert delivery.invocation_id == pending.invocation_id
    assert got[:3] == [InvocationStatus.RUNNING, PENDING, InvocationStatus.RETRYING]
    assert got[3:] == [await broker.get(done.invocation_id), None]
    assert isinstance(got[3], InvocationRecord)
    assert got[3].result == "42"
    assert await broker.get_final_many([]) == []
    with pytest.raises(InvalidKeyError):
        await broker.get_final_many(["not an id"])


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
    assert current.record is not None
    assert await broker.get(record.invocation_id) == current.record
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


async def test_release_puts_the_record_back_to_waiting_with_the_attempt_not_counted(
    broker: Broker,
) -> None:
    fresh = _record()
    failed_once = _record(
        status=InvocationStatus.RETRYING, attempt=1, error=ErrorInfo("ValueError", "boom")
    )
    await broker.submit_many([fresh, failed_once])
    taken = await _receive(broker, consumer="c1")
    assert [d.record.status for d in taken if d.record] == [InvocationStatus.RUNNING] * 2
    await broker.release(taken)
    # Unstarted: back to what the claim found, with no worker and no attempt used.
    for original in (fresh, failed_once):
        back = await broker.get(original.invocation_id)
        assert back is not None
        assert (back.status, back.attempt, back.worker_id) == (
            original.status,
            original.attempt,
            None,
        )
        assert (back.error, back.call, back.created_at) == (
            original.error,
            original.call,
            original.created_at,
        )
    again = {d.invocation_id: d for d in await _receive(broker, consumer="c2")}
    for original in (fresh, failed_once):
        delivery = again[original.invocation_id]
        assert delivery.delivery_count == 2  # deliveries still count every one
        assert delivery.record is not None
        assert (delivery.record.status, delivery.record.attempt) == (
            InvocationStatus.RUNNING,
            original.attempt + 1,
        )


async def test_release_leaves_a_record_that_is_no_longer_running(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    (delivery,) = await _receive(broker, consumer="c1")
    assert delivery.record is not None
    done = attrs.evolve(delivery.record, status=InvocationStatus.SUCCESS, result="1")
    await broker.update(done)
    await broker.release([delivery])
    assert await broker.get(record.invocation_id) == done


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
    # Letters and digits outside ASCII, and one character too many, are refused too.
    for bad_id in ("../x", "", "a b", "k" * 257, 42, "ü", "\u0661\u0662", "abc\u00b2"):
        with pytest.raises(InvalidKeyError):
            await broker.get(bad_id)  # type: ignore[arg-type]
    assert await broker.get("k" * 256) is None
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
    assert await broker.counts() == {
        s: int(s is InvocationStatus.RUNNING) for s in InvocationStatus
    }


# -- receive marks records RUNNING; finish; find_by_call ------------------------------------

# Argument names that are also record fields, and values that look like record JSON:
# a backend rewriting the record text (Redis, in Lua) must only touch the top level.
TRICKY_ARGS = {
    "status": '"pending"',
    "attempt": "7",
    "worker_id": '"x\\"y"',
    "updated_at": "1.5",
    "nested": '{"status":"failed","a":[1,{"b":"}]"}],"attempt":9}',
    "ünïcode": '"ç/€"',
}
TRICKY_CALL = CallDTO(
    CallId(TaskId("tests.brokers", "tricky"), compute_args_id(TRICKY_ARGS)), TRICKY_ARGS
)


def _outcome(
    delivery: Delivery, status: InvocationStatus = SUCCESS, **changes: Any
) -> tuple[Delivery, InvocationRecord]:
    """A (delivery, final record) pair for finish(), from the record receive() returned."""
    assert delivery.record is not None
    return delivery, attrs.evolve(delivery.record, status=status, **changes)


def _running(record: InvocationRecord, attempt: int, worker: str) -> Callable[[Any], bool]:
    """A check that a delivered record is *record* marked RUNNING by *worker*."""

    def check(claimed: Any) -> bool:
        assert isinstance(claimed, InvocationRecord)
        expected = attrs.evolve(
            record,
            status=InvocationStatus.RUNNING,
            attempt=attempt,
            worker_id=worker,
            updated_at=claimed.updated_at,
        )
        assert claimed == expected
        return True

    return check


async def test_receive_marks_the_record_running(broker: Broker) -> None:
    record = _record(
        call=TRICKY_CALL,
        status=InvocationStatus.RETRYING,
        attempt=2,
        max_retries=5,
        created_at=1764355524.1234567,  # every digit must survive the rewrite
        timeout=2.5,
        dedup_key="tricky",
        error=ErrorInfo("ValueError", 'bad "value"\n', None, "Traceback ...}"),
    )
    plain = _record()
    await broker.submit_many([record, plain])
    before = time.time()
    first, second = await _receive(broker, consumer="worker-ü 1")
    after = time.time()
    assert _running(record, 3, "worker-ü 1")(first.record)
    assert _running(plain, 1, "worker-ü 1")(second.record)
    assert first.record is not None
    assert before - 1 <= first.record.updated_at <= after + 1
    # The stored records agree with what was delivered.
    assert await broker.get_many([record.invocation_id, plain.invocation_id]) == [
        first.record,
        second.record,
    ]
    assert (await broker.counts())[InvocationStatus.RUNNING] == 2


async def test_redelivery_after_the_visibility_timeout_is_another_attempt(
    broker: Broker,
) -> None:
    record = _record()
    await broker.submit(record)
    (first,) = await _receive(broker, consumer="c1", visibility_timeout=0.2)
    assert _running(record, 1, "c1")(first.record)
    await anyio.sleep(0.3)
    (second,) = await _receive(broker, consumer="c2")
    assert second.delivery_count == 2
    assert _running(record, 2, "c2")(second.record)
    assert await broker.get(record.invocation_id) == second.record


async def test_a_final_record_is_delivered_unchanged(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    # Finished without acknowledging the entry (a worker that died between the two).
    done = attrs.evolve(record, status=SUCCESS, attempt=1, result='"ok"', worker_id="old")
    await broker.update(done)
    (delivery,) = await _receive(broker, consumer="c2")
    assert delivery.record == done
    assert await broker.get(record.invocation_id) == done
    assert (await broker.counts())[InvocationStatus.RUNNING] == 0


async def test_finish_stores_acks_notifies_and_releases_the_dedup_key(broker: Broker) -> None:
    record = _record(dedup_key="once")
    await broker.submit(record)
    watcher = _FinalWatcher(broker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        await anyio.sleep(0.2)  # let the watcher subscribe
        (delivery,) = await _receive(broker, visibility_timeout=0.2)
        assert delivery.record is not None
        done = attrs.evolve(delivery.record, status=SUCCESS, result='"ok"')
        await broker.finish([(delivery, done)])
        assert await broker.get(record.invocation_id) == done
        assert await broker.pending_count("default") == 0

        async def seen() -> bool:
            return record.invocation_id in watcher.seen

        await _until(seen, 3.0, "watch_final reporting the finished invocation")
        tg.cancel_scope.cancel()
    await anyio.sleep(0.3)  # past the visibility timeout: still never redelivered
    assert await _receive(broker, consumer="c2") == []
    again = _record(dedup_key="once")
    assert await broker.submit(again) == again, "the dedup key was released"
    assert await broker.counts() == {
        PENDING: 1,
        InvocationStatus.RUNNING: 0,
        InvocationStatus.RETRYING: 0,
        SUCCESS: 1,
        InvocationStatus.FAILED: 0,
    }
    await broker.finish([])  # an empty batch does nothing


async def test_finish_with_a_stale_receipt_the_first_outcome_wins(broker: Broker) -> None:
    record = _record()
    await broker.submit(record)
    (stale,) = await _receive(broker, consumer="c1", visibility_timeout=0.2)
    await anyio.sleep(0.3)
    (current,) = await _receive(broker, consumer="c2", visibility_timeout=30)
    assert stale.record is not None
    assert current.record is not None
    # c1 finishes late: its outcome is the first, so it is stored, but the entry is
    # c2's now and stays in flight.
    first = attrs.evolve(stale.record, status=SUCCESS, result='"from c1"')
    await broker.finish([(stale, first)])
    assert await broker.get(record.invocation_id) == first
    assert await broker.pending_count("default") == 1
    assert await _receive(broker, consumer="c3") == []
    # c2 finishes too: its outcome does not overwrite the first, but its ack counts.
    second = attrs.evolve(
        current.record,
        status=InvocationStatus.FAILED,
        error=ErrorInfo("RuntimeError", "from c2"),
    )
    await broker.finish([(current, second)])
    assert await broker.get(record.invocation_id) == first
    assert await broker.pending_count("default") == 0
    await broker.finish([(current, second)])  # again: harmless
    assert await broker.get(record.invocation_id) == first
    assert (await broker.counts())[SUCCESS] == 1


async def test_finish_a_batch_in_one_call(broker: Broker) -> None:
    records = [_record(dedup_key=f"k{i}", queue=("a", "b")[i % 2]) for i in range(200)]
    await broker.submit_many(records)
    deliveries = await _receive(broker, ["a", "b"], 200)
    assert len(deliveries) == 200
    outcomes = []
    for i, delivery in enumerate(deliveries):
        assert delivery.record is not None
        status = SUCCESS if i % 3 else InvocationStatus.FAILED
        outcomes.append((delivery, attrs.evolve(delivery.record, status=status)))
    # The same invocation twice in one batch: the first outcome wins there too.
    repeat = attrs.evolve(outcomes[1][1], status=InvocationStatus.FAILED, result='"late"')
    await broker.finish([*outcomes, (deliveries[1], repeat)])
    stored = await broker.get_many([d.invocation_id for d in deliveries])
    assert stored == [record for _, record in outcomes]
    assert await broker.pending_count("a") == 0
    assert await broker.pending_count("b") == 0
    counts = await broker.counts()
    assert (counts[SUCCESS], counts[InvocationStatus.FAILED]) == (133, 67)
    fresh = [_record(dedup_key=f"k{i}") for i in range(200)]
    assert await broker.submit_many(fresh) == fresh, "every dedup key was released"


async def test_finish_rejects_bad_outcomes_before_any_change(broker: Broker) -> None:
    one, two = _record(), _record()
    await broker.submit_many([one, two])
    first, second = await _receive(broker)
    assert first.record is not None
    assert second.record is not None
    done = attrs.evolve(first.record, status=SUCCESS)
    for bad in (
        attrs.evolve(second.record, status=InvocationStatus.RUNNING),
        attrs.evolve(second.record, status=InvocationStatus.RETRYING),
        attrs.evolve(second.record, status=PENDING),
    ):
        with pytest.raises(ValueError, match="SUCCESS or FAILED"):
            await broker.finish([(first, done), (second, bad)])
    with pytest.raises(ValueError, match="delivery is for"):
        await broker.finish(
            [(first, done), (first, attrs.evolve(done, invocation_id=two.invocation_id))]
        )
    with pytest.raises(TypeError):
        await broker.finish([(first, done), first])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await broker.finish([(done, first)])  # type: ignore[list-item]
    assert await broker.get_many([one.invocation_id, two.invocation_id]) == [
        first.record,
        second.record,
    ]
    assert await broker.pending_count("default") == 2


async def test_find_by_call_oldest_first(broker: Broker) -> None:
    ours = [_record() for _ in range(3)]
    other_args = {"x": "2"}
    other_call = CallDTO(
        CallId(TaskId("tests.brokers", "work"), compute_args_id(other_args)), other_args
    )
    other = _record(call=other_call)
    await broker.submit(ours[0])
    await broker.submit_many([other, ours[1], ours[2]])
    key = CALL.call_id.key
    assert await broker.find_by_call(key) == ours
    assert await broker.find_by_call(key, limit=2) == ours[:2]
    assert await broker.find_by_call(other_call.call_id.key) == [other]
    unused = CallId(TaskId("tests.brokers", "unused"), compute_args_id(ARGS)).key
    assert await broker.find_by_call(unused) == []
    # Records come as they are now.
    (delivery, *_) = await _receive(broker, max_items=1)
    assert delivery.invocation_id == ours[0].invocation_id
    assert (await broker.find_by_call(key, limit=1)) == [delivery.record]
    for malformed in ("nope", "tests.brokers.work", "tests.brokers.work:abc", "", 42):
        with pytest.raises(InvalidKeyError):
            await broker.find_by_call(malformed)  # type: ignore[arg-type]
    for limit in (0, -1, True, 1.5):
        with pytest.raises(ConfigurationError, match="limit"):
            await broker.find_by_call(key, limit=limit)  # type: ignore[arg-type]


# -- finish is one step for a whole batch ---------------------------------------------------


class _CountingMemoryBroker(MemoryBroker):
    """Counts ``_finish`` calls (each runs without an await: one atomic step)."""

    steps = 0

    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        self.steps += 1
        await super()._finish(outcomes)


class _CountingSqliteBroker(SqliteBroker):
    """Counts worker-thread calls (each is at most one transaction)."""

    steps = 0

    async def _run(self, op: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        self.steps += 1
        return await super()._run(op, what)


class _CountingRedisBroker(RedisBroker):
    """Counts round trips to Redis."""

    steps = 0

    async def _call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        self.steps += 1
        return await super()._call(what, operation)


_Counting = _CountingMemoryBroker | _CountingSqliteBroker | _CountingRedisBroker


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def counting_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    broker: _Counting
    if request.param == "memory":
        broker = _CountingMemoryBroker()
    elif request.param == "sqlite":
        broker = _CountingSqliteBroker(tmp_path / "counting.db")
    else:
        redis_broker = _CountingRedisBroker.from_url(request.getfixturevalue("redis_url"))
        assert isinstance(redis_broker, _CountingRedisBroker)
        broker = redis_broker
    async with broker:
        yield broker


@pytest.mark.parametrize("size", [200, 1100])
async def test_finish_of_a_batch_is_one_step(counting_broker: _Counting, size: int) -> None:
    broker = counting_broker
    records = [_record(dedup_key=f"k{i}") for i in range(size)]
    await broker.submit_many(records)
    deliveries = await _receive(broker, max_items=size)
    assert len(deliveries) == size
    outcomes = [_outcome(d) for d in deliveries]
    broker.steps = 0
    await broker.finish(outcomes)
    assert broker.steps == 1, f"finish took {broker.steps} steps for {size} outcomes"
    assert (await broker.counts())[SUCCESS] == size
    assert await broker.pending_count("default") == 0
    assert await broker.submit(_record(dedup_key="k0")) != records[0]


async def test_get_now_reads_what_get_reads_where_records_are_in_process(
    broker: Broker,
) -> None:
    record = _record()
    await broker.submit(record)
    if not broker.reads_in_process:
        # Redis and SQLite need a round trip: the waiting read is the only one.
        assert not isinstance(broker, MemoryBroker)
        with pytest.raises(NotImplementedError, match="round trip"):
            broker.get_now(record.invocation_id)
        return
    assert broker.get_now(record.invocation_id) == await broker.get(record.invocation_id)
    assert len(await _receive(broker, max_items=1)) == 1
    running = broker.get_now(record.invocation_id)
    assert running is not None
    assert running.status is InvocationStatus.RUNNING
    assert running == await broker.get(record.invocation_id)
    assert broker.get_now(new_invocation_id()) is None
    for bad_id in ("../x", "", 42):
        with pytest.raises(InvalidKeyError):
            broker.get_now(bad_id)  # type: ignore[arg-type]
    await broker.close()
    with pytest.raises(BrokerError, match="closed"):
        broker.get_now(record.invocation_id)


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
    assert (default.prefix, default.record_ttl) == ("acall:b:", None)
    assert open_broker("redis://h").record_ttl == 7 * 24 * 3600  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="max_connections >= 2"):
        open_broker("redis://h/0?max_connections=1")
    assert open_broker("redis://h/0?max_connections=2").url.endswith("max_connections=2")


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
            (delivery,) = got
            assert await worker.submit(_record(dedup_key="shared")) == delivery.record
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
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(acall_invocations)")}
        assert "acall_invocations_call" in indexes
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

        async def work() -> None:
            await broker.submit_many(records)
            assert len(await broker.get_many([r.invocation_id for r in records])) == 3000
            assert len(await _receive(broker, max_items=3000)) == 3000

        gaps = await longest_gap(work)
        assert len(gaps) > 5, "the calls finished too quickly to observe the loop"
        assert max(gaps) < 0.1, f"event loop blocked for {max(gaps) * 1000:.0f} ms"


async def test_sqlite_missing_directory_and_damaged_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
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
        # A scan reports it as damaged, with its text, and goes on.
        scanned = [item async for batch in broker.scan_records() for item in batch]
        assert len(scanned) == 1
        assert isinstance(scanned[0], DamagedRecord)
        assert scanned[0].invocation_id == record.invocation_id
        assert scanned[0].text == '{"v": 1}'
        assert "damaged" in scanned[0].error
        # Delivered without its record (a warning says why), not failing every receive.
        with caplog.at_level(logging.WARNING, logger="acall.brokers"):
            (delivery,) = await _receive(broker)
        assert delivery.invocation_id == record.invocation_id
        assert delivery.record is None
        assert f"invocation {record.invocation_id} without its record" in caplog.text
        # An outcome replaces the damaged record.
        failed = attrs.evolve(record, status=InvocationStatus.FAILED)
        await broker.finish([(delivery, failed)])
        assert await broker.get(record.invocation_id) == failed
        assert await broker.pending_count("default") == 0


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
        index = f"t:call:{CALL.call_id.key}"
        assert redis_server.command("ZRANGE", index, 0, -1, db=db) == [
            record.invocation_id.encode()
        ]
        assert redis_server.command("GET", "t:dedup:key", db=db) == record.invocation_id.encode()
        groups = redis_server.command("XINFO", "GROUPS", "t:q:default", db=db)
        assert isinstance(groups, list)
        assert b"acall-workers" in groups[0]  # type: ignore[operator]
        # A record that never expires is filed under the integer score 2**53 - 1.
        never = str(2**53 - 1).encode()
        assert redis_server.command("ZSCORE", "t:status:pending", record.invocation_id, db=db) == (
            never
        )
        before = time.time()
        (delivery,) = await _receive(broker, visibility_timeout=30.0)
        assert redis_server.command("ZSCORE", "t:status:running", record.invocation_id, db=db) == (
            never
        )
        # Its visibility deadline: a Unix time in whole milliseconds.
        pair = redis_server.command("ZRANGE", "t:inflight:default", 0, -1, "WITHSCORES", db=db)
        assert isinstance(pair, list)
        entry, deadline = pair
        assert isinstance(entry, bytes)
        assert isinstance(deadline, bytes)
        assert delivery.receipt.split("/")[1] == entry.decode()
        assert deadline.isdigit()
        assert (before + 30.0) * 1000 - 5_000 < int(deadline) <= (time.time() + 30.0) * 1000 + 1
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


@pytest.mark.redis
async def test_redis_claim_rewrites_only_the_top_level_members(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Receiving marks a record RUNNING by rewriting members of its stored JSON. Nested
    members of the same names (arguments called status, attempt...), other layouts and
    a claim of a record already RUNNING must all give the record Python would write."""
    import json

    db = int(redis_url.rsplit("/", 1)[1])
    named = {"status": '"done"', "attempt": "7", "worker_id": '"w"', "updated_at": "1.5"}
    nested_call = CallDTO(CallId(TaskId("tests.brokers", "w"), compute_args_id(named)), named)
    async with open_broker(redis_url) as broker:
        nested = _record(call=nested_call)
        pretty = _record()
        reordered = _record(attempt=2, status=InvocationStatus.RETRYING)
        # Compact, in the classes' field order: records written before the claimed
        # members came first (found by search; with nested names, by walking).
        older = _record(attempt=1)
        older_nested = _record(call=nested_call)
        await broker.submit_many([nested, pretty, reordered, older, older_nested])

        def put(record: InvocationRecord, text: str) -> None:
            key = f"acall:b:inv:{record.invocation_id}"
            assert redis_server.command("SET", key, text, db=db) == "OK"

        async def _time_out(deliveries: list[Delivery]) -> None:
            # (Not release(), which puts the record back to waiting.)
            await broker.extend(deliveries, 0.05)
            await anyio.sleep(0.2)

        as_dict = json.loads(broker._encode(pretty))  # type: ignore[attr-defined]
        put(pretty, json.dumps(as_dict, indent=2))  # whitespace everywhere
        as_dict = json.loads(broker._encode(reordered))  # type: ignore[attr-defined]
        put(reordered, json.dumps(dict(reversed(list(as_dict.items())))))  # members reversed
        for record in (older, older_nested):
            as_dict = json.loads(broker._encode(record))  # type: ignore[attr-defined]
            assert list(as_dict)[: len(RECORD_HEAD)] == list(RECORD_HEAD)
            in_field_order = {f.name: as_dict[f.name] for f in attrs.fields(InvocationRecord)}
            put(record, json.dumps(in_field_order, separators=(",", ":")))
        everyone = (nested, pretty, reordered, older, older_nested)
        first = {d.invocation_id: d for d in await _receive(broker, consumer="c1")}
        assert set(first) == {record.invocation_id for record in everyone}
        for original in everyone:
            claimed = first[original.invocation_id].record
            assert claimed is not None
            assert claimed.status is InvocationStatus.RUNNING
            assert claimed.attempt == original.attempt + 1
            assert claimed.worker_id == "c1"
            assert claimed.call == original.call  # nested members left alone
            assert claimed.queue == original.queue
            assert claimed.created_at == original.created_at
            assert await broker.get(original.invocation_id) == claimed
        assert first[nested.invocation_id].record.call.serialized_arguments == named  # type: ignore[union-attr]
        # Delivered again after its visibility timeout, to the same consumer: status and
        # worker stay, attempt and time move on.
        await _time_out([first[nested.invocation_id]])
        again = await _receive(broker, consumer="c1")
        assert [d.invocation_id for d in again] == [nested.invocation_id]
        reclaimed = again[0].record
        assert reclaimed is not None
        assert reclaimed.status is InvocationStatus.RUNNING
        assert reclaimed.attempt == 2
        assert reclaimed.worker_id == "c1"
        assert reclaimed.call == nested.call
        # A worker name with escapes in its JSON text: the next claim of that record
        # reads it the slow way, and every claim still gives the record Python would.
        odd = 'c"2\\'
        for consumer, attempt in ((odd, 2), ("c1", 3)):
            await _time_out([d for d in again if d.invocation_id == nested.invocation_id])
            again = await _receive(broker, consumer=consumer)
            assert [d.invocation_id for d in again] == [nested.invocation_id]
            reclaimed = again[0].record
            assert reclaimed is not None
            assert (reclaimed.status, reclaimed.attempt) == (InvocationStatus.RUNNING, attempt + 1)
            assert reclaimed.worker_id == consumer
            assert reclaimed.call == nested.call
            assert await broker.get(nested.invocation_id) == reclaimed


async def test_redis_missing_and_damaged_records_are_delivered_as_none(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    async with open_broker(redis_url) as broker:
        gone, damaged, fine = _record(), _record(), _record()
        await broker.submit_many([gone, damaged, fine])
        assert redis_server.command("DEL", f"acall:b:inv:{gone.invocation_id}", db=db) == 1
        redis_server.command("SET", f"acall:b:inv:{damaged.invocation_id}", "{not json", db=db)
        with caplog.at_level(logging.WARNING, logger="acall.brokers"):
            deliveries = await _receive(broker)
        assert [d.invocation_id for d in deliveries] == [
            gone.invocation_id,
            damaged.invocation_id,
            fine.invocation_id,
        ]
        assert [d.record is None for d in deliveries] == [True, True, False]
        scanned = {
            item.invocation_id: item async for batch in broker.scan_records() for item in batch
        }
        assert set(scanned) == {damaged.invocation_id, fine.invocation_id}
        damaged_scan = scanned[damaged.invocation_id]
        assert isinstance(damaged_scan, DamagedRecord)
        assert damaged_scan.text == "{not json"
        assert isinstance(scanned[fine.invocation_id], InvocationRecord)
        assert f"invocation {damaged.invocation_id} without its record" in caplog.text
        assert (
            redis_server.command("GET", f"acall:b:inv:{damaged.invocation_id}", db=db)
            == b"{not json"
        ), "an unreadable record is left as it is"
        outcomes = [
            (d, attrs.evolve(r, status=SUCCESS))
            for d, r in zip(deliveries, [gone, damaged, fine], strict=True)
        ]
        await broker.finish(outcomes)
        # A missing record is not created; a damaged one is replaced.
        assert await broker.get_many([r.invocation_id for _, r in outcomes]) == [
            None,
            outcomes[1][1],
            outcomes[2][1],
        ]
        assert await broker.pending_count("default") == 0


@pytest.mark.redis
async def test_redis_call_index_lives_as_long_as_its_records(
    redis_url: str, redis_server: RedisServer
) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    key = CALL.call_id.key
    index = f"acall:b:call:{key}"

    def members() -> list[str]:
        found = redis_server.command("ZRANGE", index, 0, -1, db=db)
        assert isinstance(found, list)
        return [member.decode() for member in found]  # type: ignore[union-attr]

    async with open_broker(redis_url, record_ttl=0.3) as broker:
        a, b, c = _record(), _record(), _record()
        await broker.submit_many([a, b, c])
        assert members() == [a.invocation_id, b.invocation_id, c.invocation_id]
        first, second, third = await _receive(broker)
        await broker.finish([_outcome(first), _outcome(second)])
        assert redis_server.command("PTTL", index, db=db) == -1, "c is still running"
        await anyio.sleep(0.45)  # a and b expired
        assert await broker.find_by_call(key) == [third.record]
        assert members() == [c.invocation_id], "find_by_call drops expired ids"
        d = _record()
        await broker.submit(d)
        assert members() == [c.invocation_id, d.invocation_id]
        # Once none is left unfinished, the index expires with the last record.
        (fourth,) = await _receive(broker)
        await broker.finish([_outcome(third), _outcome(fourth)])
        pttl = redis_server.command("PTTL", index, db=db)
        assert isinstance(pttl, int)
        assert 0 < pttl <= 300
        await anyio.sleep(0.45)
        assert redis_server.command("EXISTS", index, db=db) == 0
        assert await broker.find_by_call(key) == []
        # Expired ids at the front are dropped by the next submission too.
        e, f = _record(), _record()
        await broker.submit_many([e, f])
        fifth, _ = await _receive(broker)
        await broker.update(_outcome(fifth)[1])
        await anyio.sleep(0.45)
        g = _record()
        await broker.submit(g)
        assert members() == [f.invocation_id, g.invocation_id]
        assert redis_server.command("PTTL", index, db=db) == -1


async def test_watch_final_first_yields_once_subscribed(broker: Broker) -> None:
    """The first item arrives right after subscribing, before anything finishes."""
    async with contextlib.aclosing(broker.watch_final()) as stream:
        with anyio.fail_after(5):
            first = await stream.__anext__()
    assert first == set()


async def test_deeply_nested_non_str_id_is_an_invalid_key_error() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    async with MemoryBroker() as broker:
        with pytest.raises(InvalidKeyError, match="expected a str, got list"):
            await broker.get(deep)  # type: ignore[arg-type]
