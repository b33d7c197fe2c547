"""The concurrency building blocks: Wakeup and GroupCommit (real tasks, real cancellation)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from acall._concurrency import GroupCommit, Wakeup

# -- Wakeup -----------------------------------------------------------------------------


async def test_wakeup_set_before_sleep_returns_at_once_and_is_consumed() -> None:
    wake = Wakeup()
    wake.set()
    with anyio.fail_after(1):
        await wake.sleep()
    # Consumed: the next sleep waits for the next set().
    with anyio.move_on_after(0.05) as scope:
        await wake.sleep()
    assert scope.cancelled_caught


async def test_wakeup_wakes_a_sleeper_once() -> None:
    wake = Wakeup()
    woken = 0

    async def sleeper() -> None:
        nonlocal woken
        await wake.sleep()
        woken += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await anyio.sleep(0.01)
        assert woken == 0
        wake.set()
    assert woken == 1
    # The sleeper consumed the wake-up: none is left over.
    with anyio.move_on_after(0.05) as scope:
        await wake.sleep()
    assert scope.cancelled_caught


async def test_wakeup_set_after_a_cancelled_sleep_is_kept_for_the_next() -> None:
    wake = Wakeup()
    with anyio.move_on_after(0.02):
        await wake.sleep()
    wake.set()  # nobody sleeps now: the next sleep must not miss it
    with anyio.fail_after(1):
        await wake.sleep()


# -- GroupCommit ------------------------------------------------------------------------


def _recorder(
    commit: GroupCommit[int, int], results: dict[int, int]
) -> Callable[[int], Coroutine[Any, Any, None]]:
    """A caller that submits *i* and records its result under *i*."""

    async def one(i: int) -> None:
        results[i] = await commit.submit(i)

    return one


def _recording(
    writes: _Writes,
) -> tuple[dict[int, int], Callable[[int], Coroutine[Any, Any, None]]]:
    """The results by item of callers of a group commit over *writes*, and a caller."""
    results: dict[int, int] = {}
    return results, _recorder(GroupCommit(writes), results)


def _error_recorder(
    commit: GroupCommit[int, int], errors: list[BaseException], kind: type[Exception]
) -> Callable[[int], Coroutine[Any, Any, None]]:
    """A caller that submits *i* and records the error of type *kind* it gets."""

    async def one(i: int) -> None:
        try:
            await commit.submit(i)
        except kind as exc:
            errors.append(exc)

    return one


class _Writes:
    """A write function recording its batches; the first call can be held open."""

    def __init__(
        self, hold_first: bool = False, fail_with: Exception | None = None, hold_call: int = 1
    ) -> None:
        self.batches: list[list[int]] = []
        self.hold = anyio.Event() if hold_first else None
        self.hold_call = hold_call
        self.entered = anyio.Event()
        self.fail_with = fail_with

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        if self.hold is not None and len(self.batches) == self.hold_call:
            await self.hold.wait()
        await anyio.sleep(0.005)  # a round trip: callers arriving meanwhile queue up
        if self.fail_with is not None:
            raise self.fail_with
        return [item * 10 for item in items]


async def test_concurrent_submits_share_batches_and_get_their_own_results() -> None:
    writes = _Writes()
    results, one = _recording(writes)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    assert results == {i: i * 10 for i in range(50)}
    assert sorted(i for batch in writes.batches for i in batch) == list(range(50))
    assert len(writes.batches) < 50  # items written together, not one call each


async def test_max_batch_bounds_each_write() -> None:
    writes = _Writes()
    commit: GroupCommit[int, int] = GroupCommit(writes, max_batch=7)
    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(commit.submit, i)
    assert max(len(batch) for batch in writes.batches) <= 7
    assert sorted(i for batch in writes.batches for i in batch) == list(range(30))


async def test_a_cancelled_writer_does_not_fail_the_others_of_its_batch() -> None:
    writes = _Writes(hold_first=True)
    results, one = _recording(writes)

    writer_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_in_scope, writer_scope, one, 0)
        await writes.entered.wait()  # item 0's task is writing, held open
        for i in (1, 2, 3):
            tg.start_soon(one, i)
        await anyio.sleep(0.01)
        assert results == {}
        writer_scope.cancel()  # the writer of the batch [0] is cancelled mid-write
        assert writes.hold is not None
        writes.hold.set()
    # The cancelled caller got no result and its item was not written again; the others
    # were written by the next caller whose turn it was.
    assert results == {1: 10, 2: 20, 3: 30}
    assert writes.batches[0] == [0]
    assert sorted(i for batch in writes.batches[1:] for i in batch) == [1, 2, 3]


async def _in_scope(scope: anyio.CancelScope, fn: object, *args: int) -> None:
    with scope:
        await fn(*args)  # type: ignore[operator]


async def test_a_cancelled_writer_hands_its_in_flight_batch_to_the_next() -> None:
    writes = _Writes(hold_first=True)
    results, one = _recording(writes)

    writer = asyncio.ensure_future(one(0))
    others = [asyncio.ensure_future(one(i)) for i in (1, 2)]
    await writes.entered.wait()  # batch [0] in flight; 1 and 2 queued behind it
    await anyio.sleep(0.01)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    with anyio.fail_after(2):
        await asyncio.gather(*others)
    assert results == {1: 10, 2: 20}
    assert 0 not in [i for batch in writes.batches[1:] for i in batch]


async def test_items_of_a_batch_cut_by_its_writers_cancellation_are_written_again() -> None:
    # Task 0 writes [0], then goes on with [1, 2] (queued meanwhile) and is cancelled
    # while that second batch is in flight: 1 and 2 must still get their results.
    writes = _Writes(hold_first=True, hold_call=2)
    results, one = _recording(writes)

    writer = asyncio.ensure_future(one(0))
    await asyncio.sleep(0)  # task 0 starts writing [0]
    others = [asyncio.ensure_future(one(i)) for i in (1, 2)]
    with anyio.fail_after(2):
        while len(writes.batches) < 2:
            await asyncio.sleep(0.001)
    assert writes.batches == [[0], [1, 2]]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert writes.hold is not None
    writes.hold.set()
    with anyio.fail_after(2):
        await asyncio.gather(*others)
    assert results == {1: 10, 2: 20}  # task 0 was cancelled: no result for it
    assert writes.batches[2:] == [[1, 2]]  # written again by the next caller


async def test_a_cancelled_sleeper_is_not_written_and_does_not_stall_the_rest() -> None:
    writes = _Writes(hold_first=True)
    results, one = _recording(writes)

    first = asyncio.ensure_future(one(0))
    await writes.entered.wait()
    quitter = asyncio.ensure_future(one(1))
    stayer = asyncio.ensure_future(one(2))
    await anyio.sleep(0.01)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert writes.hold is not None
    writes.hold.set()
    with anyio.fail_after(2):
        await asyncio.gather(first, stayer)
    assert results == {0: 0, 2: 20}
    assert all(1 not in batch for batch in writes.batches)


async def test_a_write_error_reaches_every_caller_of_the_batch() -> None:
    writes = _Writes(fail_with=ConnectionError("down"))
    commit: GroupCommit[int, int] = GroupCommit(writes)
    errors: list[BaseException] = []
    one = _error_recorder(commit, errors, ConnectionError)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(one, i)
    assert len(errors) == 5
    assert all(str(e) == "down" for e in errors)


async def test_a_write_giving_the_wrong_number_of_results_fails_every_caller() -> None:
    async def short(items: list[int]) -> list[int]:
        await anyio.lowlevel.checkpoint()
        return items[:-1]

    commit: GroupCommit[int, int] = GroupCommit(short)
    errors: list[BaseException] = []
    one = _error_recorder(commit, errors, RuntimeError)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
    assert len(errors) == 4
    assert "results" in str(errors[0])
