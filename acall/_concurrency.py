"""Small concurrency building blocks on anyio: shared single-flight results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["Flight", "SingleFlight"]

T = TypeVar("T")
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
