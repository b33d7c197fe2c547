"""Scanning every record (what the blob collector does in each worker) holds one batch
at a time: its memory does not grow with the number of records kept."""

from __future__ import annotations

import tracemalloc

import pytest

from acall.brokers import Broker, open_broker
from acall.dto import CallDTO, InvocationRecord, new_invocation_id
from acall.hashing import compute_args_id
from acall.ids import CallId, TaskId

pytestmark = pytest.mark.slow

ARGS = {"x": "1"}
CALL = CallDTO(CallId(TaskId("tests.scan", "work"), compute_args_id(ARGS)), ARGS)
RECORDS = 20_000
BATCH = 200
#: A batch of decoded records takes well under 1 MiB here; an id kept per record seen
#: (about 110 bytes each) would add over 2 MiB.
PEAK_LIMIT = 2 * 1024 * 1024


async def _scan(broker: Broker) -> tuple[int, int]:
    """(records seen, peak bytes allocated while scanning)."""
    count = 0
    tracemalloc.start()
    try:
        async for batch in broker.scan_records(BATCH):
            assert 0 < len(batch) <= BATCH
            count += len(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


async def test_scan_records_memory_does_not_grow_with_the_records(backend_url: str) -> None:
    async with open_broker(backend_url) as broker:
        for _ in range(RECORDS // 1000):
            batch = [
                InvocationRecord(invocation_id=new_invocation_id(), call=CALL) for _ in range(1000)
            ]
            await broker.submit_many(batch)
        count, peak = await _scan(broker)
    assert count == RECORDS
    assert peak < PEAK_LIMIT, f"scanning {RECORDS:,} records peaked at {peak:,} bytes"
