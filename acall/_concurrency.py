"""Small concurrency building blocks on anyio: single-flight results, group commit."""

from __future__ import annotations

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
    """A reusable wake-up call for one task; the event exists only while it sleeps.

    Creating an anyio Event costs a backend lookup; thousands of handles or writers
    that mostly never sleep should not pay it.
    """

    __slots__ = ("_event", "_pending")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._pending = False

    def set(self) -> None:
        """Wake the sleeper (or make its next :meth:`sleep` return at once)."""
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def sleep(self) -> None:
        """Wait for :meth:`set` (consuming it)."""
        if not self._pending:
            self._event = anyio.Event()
            try:
                await self._event.wait()
            finally:
                self._event = None
        self._pending = False


class _Pending(Generic[T, R]):
    __slots__ = ("done", "error", "item", "result", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = False
        self.wake = Wakeup()


class GroupCommit(Generic[T, R]):
    """Turns concurrent single writes into batched ones (group commit).

    A caller with an item writes it at once if no write is in progress, together with
    every item that arrived meanwhile, and keeps writing until none is left; each of the
    others sleeps until the batch carrying its item is written (or, if the writer was
    cancelled first, until it is its turn to write). No timer: no added latency when
    idle, and under load one round trip (one SQLite transaction, one Redis call) carries
    many items.

    :param write: writes a batch and returns one result per item, in order.
    :param interrupted: builds the error given to the other callers of a batch whose
        writer was cancelled (their items may or may not have been written).
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        interrupted: Callable[[], Exception],
        max_batch: int = 500,
    ) -> None:
        self._write = write
        self._interrupted = interrupted
        self._max_batch = max_batch
        self._pending: list[_Pending[T, R]] = []
        self._writing = False

    async def submit(self, item: T) -> R:
        """Write *item* (in some batch) and return its result."""
        entry: _Pending[T, R] = _Pending(item)
        self._pending.append(entry)
        while not entry.done:
            if self._writing:
                await entry.wake.sleep()
                continue
            self._writing = True
            try:
                while self._pending:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    await self._write_batch(batch)
            finally:
                self._writing = False
                if self._pending:  # cancelled with items left: the next one writes
                    self._pending[0].wake.set()
        if entry.error is not None:
            raise entry.error
        result: R = entry.result  # type: ignore[assignment]
        return result

    async def _write_batch(self, batch: list[_Pending[T, R]]) -> None:
        error: BaseException | None = None
        results: Sequence[R] = ()
        try:
            results = await self._write([e.item for e in batch])
        except BaseException as exc:
            # A cancellation belongs to the writing task alone: the others get an error
            # of their own saying their write was interrupted.
            error = self._interrupted() if isinstance(exc, anyio.get_cancelled_exc_class()) else exc
            raise
        finally:
            for i, entry in enumerate(batch):
                entry.error = error
                if error is None:
                    entry.result = results[i]
                entry.done = True
                entry.wake.set()
