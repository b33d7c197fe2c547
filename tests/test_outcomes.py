"""The worker's outcome writer: batches, retries while the broker is down, and entries
left unacknowledged (to be delivered again) when an outcome cannot be recorded."""

from __future__ import annotations

import time

import anyio
import pytest

from acall import CallDTO, CallId, InvocationStatus, TaskId, compute_args_id
from acall._outcomes import Outcome, OutcomeWriter
from acall.brokers.base import Delivery
from acall.brokers.memory import MemoryBroker
from acall.dto import InvocationRecord, new_invocation_id, succeeded
from acall.errors import BrokerUnavailableError

ARGS = {"x": "1"}
CALL = CallDTO(CallId(TaskId("tests.outcomes", "f"), compute_args_id(ARGS)), ARGS)


class FlakyBroker(MemoryBroker):
    """A memory broker whose next ``fail`` finish calls raise ``error``."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: anyio.Event | None = None  # set: finish waits for it
        self.fail = 0
        self.error: Exception = BrokerUnavailableError("down for a moment")
        self.batches: list[int] = []

    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        self.batches.append(len(outcomes))
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            self.fail -= 1
            raise self.error
        await super()._finish(outcomes)


async def _received(broker: MemoryBroker, count: int) -> list[Delivery]:
    records = [InvocationRecord(new_invocation_id(), CALL) for _ in range(count)]
    await broker.submit_many(records)
    return await broker.receive(["default"], count, consumer="w", visibility_timeout=0.3, wait=0)


def _outcome(delivery: Delivery) -> Outcome:
    assert delivery.record is not None
    return delivery, succeeded(delivery.record, "1", time.time())


async def _write(broker: FlakyBroker, outcomes: list[Outcome]) -> list[tuple[int, bool]]:
    settled: list[tuple[int, bool]] = []
    writer = OutcomeWriter(
        broker, patience=5.0, done=lambda batch, ok: settled.append((len(batch), ok))
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        for delivery, record in outcomes:
            writer.post(delivery, record)
        writer.close()
    assert writer.pending == 0
    return settled


async def test_outcomes_posted_together_are_recorded_in_one_call() -> None:
    async with FlakyBroker() as broker:
        deliveries = await _received(broker, 50)
        settled = await _write(broker, [_outcome(d) for d in deliveries])
        assert settled == [(50, True)]
        assert broker.batches == [50]
        records = await broker.get_many([d.invocation_id for d in deliveries])
        assert all(r is not None and r.status is InvocationStatus.SUCCESS for r in records)
        await anyio.sleep(0.4)  # past the visibility timeout: acknowledged, never back
        assert (
            await broker.receive(["default"], 50, consumer="w", visibility_timeout=1, wait=0) == []
        )


async def test_an_unreachable_broker_is_waited_for() -> None:
    async with FlakyBroker() as broker:
        deliveries = await _received(broker, 3)
        broker.fail = 2
        settled = await _write(broker, [_outcome(d) for d in deliveries])
        assert settled == [(3, True)]
        assert broker.batches == [3, 3, 3]  # two failures, then recorded


@pytest.mark.parametrize("error", [RuntimeError("a bug"), BrokerUnavailableError("gone")])
async def test_an_outcome_that_cannot_be_recorded_is_delivered_again(error: Exception) -> None:
    async with FlakyBroker() as broker:
        deliveries = await _received(broker, 2)
        broker.error = error
        broker.fail = 1_000  # for good
        writer_patience = 0.3
        settled: list[bool] = []
        writer = OutcomeWriter(
            broker, patience=writer_patience, done=lambda batch, ok: settled.append(ok)
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            for delivery in deliveries:
                writer.post(*_outcome(delivery))
            writer.close()
        assert settled == [False]
        broker.fail = 0
        await anyio.sleep(0.4)  # the visibility timeout passes: the entries come back
        again = await broker.receive(["default"], 2, consumer="w2", visibility_timeout=1, wait=0)
        assert sorted(d.invocation_id for d in again) == sorted(d.invocation_id for d in deliveries)


async def test_a_write_cancelled_with_the_worker_leaves_its_batch_unsettled() -> None:
    async with FlakyBroker() as broker:
        deliveries = await _received(broker, 4)
        broker.hold = anyio.Event()
        settled: list[bool] = []
        writer = OutcomeWriter(broker, patience=5.0, done=lambda batch, ok: settled.append(ok))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            for delivery in deliveries:
                writer.post(*_outcome(delivery))
            while not broker.batches:  # the write has started, and waits
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert settled == []
        assert writer.pending == 4  # still the worker's to hand back
        records = await broker.get_many([d.invocation_id for d in deliveries])
        assert all(r is not None and r.status is InvocationStatus.RUNNING for r in records)
