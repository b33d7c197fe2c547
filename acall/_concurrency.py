"""Small concurrency building blocks: single-flight results, wake-up calls, group commit.

acall runs on asyncio: the hot paths (a wake-up call per awaited handle) use bare asyncio
futures, the rest anyio primitives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["Flight", "GroupCommit", "SingleFlight", "Wakeup"]

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)


class Flight(Generic[T]):
    """One in-progress computation that several tasks may await.

    If the task running it fails, waiters see the same exception. If it is *cancelled*,
    waiters are released with :attr:`abandoned` set and should start over: the
    cancellation belonged to the leader's scope, not to theirs.
    """

    __slots__ = ("_done", "_error", "_value", "abandoned")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.abandoned = False

    def set_result(self, value: T) -> None:
        """Publish the value and wake every waiter."""
        self._value = value
        self._done.set()

    def set_error(self, error: BaseException) -> None:
        """Publish a failure and wake every waiter."""
        self._error = error
        self._done.set()

    def abandon(self) -> None:
        """Release waiters without a result (the leader was cancelled)."""
        self.abandoned = True
        self._done.set()

    async def wait(self) -> T:
        """Wait for the result; re-raise the leader's error."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value


class SingleFlight(Generic[K, T]):
    """Runs at most one computation per key at a time; concurrent callers share it."""

    def __init__(self) -> None:
        self._flights: dict[K, Flight[T]] = {}

    def get(self, key: K) -> Flight[T] | None:
        """Return the flight in progress for *key*, if any."""
        return self._flights.get(key)

    def start(self, key: K) -> Flight[T]:
        """Register a new flight for *key*; the caller must finish it with :meth:`finish`."""
        flight: Flight[T] = Flight()
        self._flights[key] = flight
        return flight

    def finish(
        self,
        key: K,
        flight: Flight[T],
        *,
        value: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Publish the outcome of *flight* and forget it (cancellation abandons it)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if error is None:
            flight.set_result(value)
        elif isinstance(error, anyio.get_cancelled_exc_class()):
            flight.abandon()
        else:
            flight.set_error(error)

    async def run(self, key: K, func: Callable[[], Awaitable[T]]) -> T:
        """Return ``await func()``, sharing one execution among concurrent callers."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            result = await flight.wait()
            if not flight.abandoned:
                return result
        flight = self.start(key)
        try:
            value = await func()
        except BaseException as exc:
            self.finish(key, flight, error=exc)
            raise
        self.finish(key, flight, value=value)
        return value


class Wakeup:
    """A reusable wake-up call for one task; a future exists only while it sleeps.

    Thousands of handles or writers that mostly never sleep should not pay for an event
    each, and those that do sleep hold one bare asyncio future: an anyio event would add
    an asyncio event, its waiter queue and two coroutine frames per sleeper, which the
    cyclic garbage collector then walks again and again while thousands wait at once.
    (acall runs on asyncio; anyio cancel scopes cancel the task awaiting the future.)
    """

    __slots__ = ("_future", "_pending")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._pending = False

    def set(self) -> None:
        """Wake the sleeper (or make its next :meth:`sleep` return at once)."""
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():  # not cancelled: the sleeper consumes this wake-up
                future.set_result(None)
                return
        self._pending = True

    def sleep(self) -> Awaitable[None]:
        """Wait for :meth:`set` (consuming it): ``await wakeup.sleep()``.

        Not a coroutine function: the awaitable is the future itself, one frame less
        for each of thousands of sleepers.
        """
        if self._pending:
            self._pending = False
            return _awake()
        self._future = future = asyncio.get_running_loop().create_future()
        return future


async def _awake() -> None:
    """What :meth:`Wakeup.sleep` returns when the wake-up came first: no wait."""


class _Pending(Generic[T, R]):
    __slots__ = ("done", "error", "item", "result", "wake")

    def __init__(self, item: T, wake: Wakeup) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = False
        self.wake = wake


class GroupCommit(Generic[T, R]):
    """Turns concurrent single writes into batched ones (group commit).

    A caller with an item writes it at once if no write is in progress, together with
    every item that arrived meanwhile, and keeps writing until none is left; each of the
    others sleeps until the batch carrying its item is written. No timer: no added
    latency when idle, and under load one round trip (one SQLite transaction, one Redis
    call) carries many items.

    Writes must be idempotent (submissions by invocation id, look-ups, outcomes): when
    the task writing a batch is cancelled, that cancellation is its own, so the other
    items of the batch go back to the front of the queue and are written (perhaps
    again) by the next caller whose turn it is.

    :param write: writes a batch and returns one result per item, in order.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 500,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._pending: list[_Pending[T, R]] = []
        self._writing = False

    async def submit(self, item: T) -> R:
        """Write *item* (in some batch) and return its result."""
        entry: _Pending[T, R] = _Pending(item, Wakeup())
        pending = self._pending
        pending.append(entry)
        try:
            while not entry.done:
                if self._writing:
                    await entry.wake.sleep()
                    continue
                self._writing = True
                try:
                    while pending:
                        batch = pending[: self._max_batch]
                        del pending[: self._max_batch]
                        await self._write_batch(batch)
                finally:
                    self._writing = False
        except BaseException:
            if not entry.done and entry in pending:  # gave up: not worth writing any more
                pending.remove(entry)
            if pending and not self._writing:  # items left and no writer: wake the next
                pending[0].wake.set()
            raise
        if entry.error is not None:
            raise entry.error
        result: R = entry.result  # type: ignore[assignment]
        return result

    async def _write_batch(self, batch: list[_Pending[T, R]]) -> None:
        try:
            results = await self._write([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} writes gave {len(results)} results")
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                # The writer's own cancellation: its item is dropped by submit(), the
                # others are written again (idempotent) by whoever writes next.
                self._pending[:0] = batch
            else:
                for entry in batch:
                    entry.error = exc
                    entry.done = True
                    entry.wake.set()
            raise
        for entry, result in zip(batch, results, strict=True):
            entry.result = result
            entry.done = True
            entry.wake.set()
