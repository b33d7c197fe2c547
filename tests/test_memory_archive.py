"""The memory broker packs finished records into tuples the garbage collector forgets.

Packing must lose nothing: every read (get, get_now, get_many, find_by_call, scans,
counts) returns a record equal to the one stored, updates over a packed record work,
and record_ttl still removes packed records with their call index.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import anyio
import attrs
import pytest
from helpers import record_with_every_field

from acall.brokers import memory
from acall.brokers._packed import PACKED_FIELDS, RecordPacker
from acall.brokers.memory import MemoryBroker
from acall.dto import CallDTO, InvocationRecord, InvocationStatus, new_invocation_id
from acall.hashing import compute_args_id
from acall.ids import CallId, TaskId

ARGS = {"x": "1", "name": '"ada"'}
CALL = CallDTO(CallId(TaskId("tests.archive", "work"), compute_args_id(ARGS)), ARGS)
OTHER = CallDTO(CallId(TaskId("tests.archive.more", "other"), compute_args_id({})), {})
SUCCESS = InvocationStatus.SUCCESS
FAILED = InvocationStatus.FAILED


def _record(**changes: Any) -> InvocationRecord:
    return attrs.evolve(InvocationRecord(invocation_id=new_invocation_id(), call=CALL), **changes)


def _full_record() -> InvocationRecord:
    """A record with every field set to something other than its default."""
    return record_with_every_field(OTHER, status=FAILED)


def test_the_packed_fields_are_the_records_fields() -> None:
    assert tuple(f.name for f in attrs.fields(InvocationRecord)) == PACKED_FIELDS


@pytest.mark.parametrize("record", [_full_record(), _record(), _record(status=SUCCESS)])
def test_unpack_gives_back_an_equal_record(record: InvocationRecord) -> None:
    packer = RecordPacker()
    packed = packer.pack(record)
    assert packer.unpack(packed) == record
    assert packer.status(packed) is record.status
    assert packer.call_key(packed) == record.call_id.key
    # Every field compared, the call's parts included.
    unpacked = packer.unpack(packed)
    for name in PACKED_FIELDS:
        assert getattr(unpacked, name) == getattr(record, name), name
    assert unpacked.call.call_id.task_id == record.call.call_id.task_id


def test_a_packed_record_is_not_tracked_by_the_collector() -> None:
    packer = RecordPacker()
    holder = {"id": packer.pack(_full_record())}
    assert not gc.is_tracked(holder["id"])
    assert not gc.is_tracked(holder)  # nor the dict holding it
    assert gc.is_tracked(_full_record())  # what it replaces


@pytest.fixture
def archive_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack finished records at the next purge instead of a second later."""
    monkeypatch.setattr(memory, "ARCHIVE_AFTER", 0.0)


async def _finished(broker: MemoryBroker, record: InvocationRecord) -> InvocationRecord:
    await broker.submit(record)
    final = attrs.evolve(record, status=SUCCESS, result='"done"', updated_at=time.time())
    await broker.update(final)
    return final


@pytest.mark.usefixtures("archive_at_once")
async def test_every_read_returns_packed_records_unchanged() -> None:
    async with MemoryBroker() as broker:
        finals = [await _finished(broker, _record()) for _ in range(5)]
        live = _record()
        await broker.submit(live)
        await broker.get(live.invocation_id)  # a purge: the finished ones get packed
        data = broker._data
        assert set(data.archive) == {r.invocation_id for r in finals}
        assert set(data.records) == {live.invocation_id}
        assert not gc.is_tracked(data.archive)

        assert await broker.get(finals[0].invocation_id) == finals[0]
        assert broker.get_now(finals[1].invocation_id) == finals[1]
        ids = [r.invocation_id for r in [*finals, live]]
        assert await broker.get_many(ids) == [*finals, live]
        assert await broker.find_by_call(CALL.call_id.key) == [*finals, live]
        scanned = [record async for batch in broker.scan_records(2) for record in batch]
        assert sorted(scanned, key=lambda r: r.invocation_id) == sorted(
            [*finals, live], key=lambda r: r.invocation_id
        )
        counts = await broker.counts()
        assert {s: n for s, n in counts.items() if n} == {SUCCESS: 5, InvocationStatus.PENDING: 1}
        # Submitting a known id again returns the stored record.
        again = attrs.evolve(finals[2], status=InvocationStatus.PENDING, result=None)
        assert await broker.submit(again) == finals[2]


@pytest.mark.usefixtures("archive_at_once")
async def test_an_update_over_a_packed_record_replaces_it() -> None:
    async with MemoryBroker() as broker:
        final = await _finished(broker, _record())
        await broker.get(final.invocation_id)
        assert final.invocation_id in broker._data.archive
        again = attrs.evolve(final, result='"again"', attempt=2)
        await broker.update(again)
        assert final.invocation_id not in broker._data.archive
        assert await broker.get(final.invocation_id) == again
        await broker.get(final.invocation_id)  # packed again, with the new contents
        assert final.invocation_id in broker._data.archive
        assert await broker.get(final.invocation_id) == again


@pytest.mark.usefixtures("archive_at_once")
async def test_record_ttl_removes_packed_records_and_their_call_index() -> None:
    async with MemoryBroker(record_ttl=0.05) as broker:
        final = await _finished(broker, _record())
        await broker.get(final.invocation_id)
        assert final.invocation_id in broker._data.archive
        await anyio.sleep(0.06)
        assert await broker.get(final.invocation_id) is None
        assert final.invocation_id not in broker._data.archive
        assert CALL.call_id.key not in broker._data.by_call
        assert await broker.find_by_call(CALL.call_id.key) == []


async def test_finished_records_stay_objects_for_a_while() -> None:
    # Clients waiting on a result read it right away, unpacked.
    async with MemoryBroker() as broker:
        final = await _finished(broker, _record())
        assert await broker.get(final.invocation_id) == final
        assert final.invocation_id in broker._data.records
        assert not broker._data.archive


async def test_finished_deliveries_leave_no_pile_of_stale_heap_items() -> None:
    # Each delivery pushes a visibility item that only comes due after the timeout;
    # finishing thousands must not keep thousands of them.
    async with MemoryBroker() as broker:
        for _ in range(5):
            records = [_record() for _ in range(1000)]
            await broker.submit_many(records)
            deliveries = await broker.receive(
                ["default"], 1000, consumer="c", visibility_timeout=600.0, wait=0.0
            )
            assert len(deliveries) == 1000
            await broker.finish(
                [(d, attrs.evolve(d.record, status=SUCCESS)) for d in deliveries if d.record]
            )
        queue = broker._data.queues["default"]
        assert queue.size == 0
        assert len(queue.waiting) <= memory._COMPACT_SLACK
        assert len(queue.ready) <= memory._COMPACT_SLACK
        # Still a working queue.
        live = _record()
        await broker.submit(live)
        [delivery] = await broker.receive(
            ["default"], 10, consumer="c", visibility_timeout=60.0, wait=0.0
        )
        assert delivery.invocation_id == live.invocation_id


async def test_the_call_index_keeps_every_invocation_of_a_call_in_order() -> None:
    async with MemoryBroker(record_ttl=None) as broker:
        first, second, third = _record(), _record(), _record()
        for record in (first, second, third):
            await broker.submit(record)
        ids = [r.invocation_id for r in await broker.find_by_call(CALL.call_id.key)]
        assert ids == [first.invocation_id, second.invocation_id, third.invocation_id]
        assert len(await broker.find_by_call(CALL.call_id.key, limit=2)) == 2
        other = attrs.evolve(_record(), call=OTHER)
        await broker.submit(other)
        assert await broker.find_by_call(OTHER.call_id.key) == [other]
        assert broker._data.by_call[OTHER.call_id.key] == other.invocation_id


async def test_each_operation_packs_a_bounded_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "ARCHIVE_BATCH", 2)
    monkeypatch.setattr(memory, "ARCHIVE_AFTER", 0.3)
    async with MemoryBroker() as broker:
        finals = [await _finished(broker, _record()) for _ in range(5)]
        data = broker._data
        assert not data.archive
        await anyio.sleep(0.35)  # all five due at once
        sizes = []
        for _ in range(3):
            broker.get_now(finals[0].invocation_id)
            sizes.append(len(data.archive))
        assert sizes == [2, 4, 5]
        assert await broker.get_many([r.invocation_id for r in finals]) == finals
