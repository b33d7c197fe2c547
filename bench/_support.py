"""Helpers shared by the asynchronous figure groups (``calls``, ``worker``).

* :func:`per_item` turns the timing of a batch (one harness call running ``k`` items)
  into the timing of one item;
* :func:`timing_from_rounds` builds a :class:`~bench.harness.Timing` from wall-clock
  rounds measured by hand (end-to-end runs that the harness cannot loop);
* :func:`versus_limit` prints a value against an absolute limit (``tasks/s >= 20,000``,
  ``stall <= 20 ms``) on the usual one-line format;
* :class:`Heartbeat` measures the longest event-loop stall while some work runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from bench.harness import Figure, Target, Timing

__all__ = ["Heartbeat", "per_item", "timing_from_rounds", "versus_limit"]


def per_item(timing: Timing, k: int, name: str | None = None) -> Timing:
    """The timing of one of the ``k`` items each timed call ran."""
    return Timing(name or timing.name, timing.loops * k, tuple(ns / k for ns in timing.per_call_ns))


def timing_from_rounds(name: str, seconds: Sequence[float], items: int) -> Timing:
    """A timing whose rounds each took ``seconds[i]`` for ``items`` items."""
    return Timing(name, items, tuple(s * 1e9 / items for s in seconds))


def versus_limit(
    group: str,
    name: str,
    subject: str,
    value: float,
    unit: str,
    *,
    limit: float,
    op: Literal[">=", "<="],
    description: str,
    limit_name: str = "target",
    details: Mapping[str, Any] | None = None,
) -> Figure:
    """A figure comparing ``value`` with an absolute ``limit`` in the same unit.

    The ratio is value / limit and the target is ``op 1x``, so the line reads e.g.
    ``acall 25.1 k/s   target 20.0 k/s   ratio 1.26x (target >= 1x) OK``.
    """
    return Figure(
        group,
        name,
        subject,
        value,
        unit,
        anchor_name=limit_name,
        anchor_value=limit,
        ratio=value / limit,
        target=Target(op, 1, description),
        details=dict(details or {}),
    )


class Heartbeat:
    """Measures the longest gap between ticks of a coroutine sleeping ``interval`` s.

    ``async with Heartbeat() as hb: <work>`` then ``hb.max_gap`` (seconds) is the longest
    time the event loop could not run the ticker: the worst latency any other coroutine
    would have seen. The ticker runs a little before and after the block, so a block that
    never yields (synchronous work) shows up as one gap as long as itself.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.max_gap = 0.0
        self.ticks = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._beat())
        await asyncio.sleep(5 * self.interval)  # the ticker is running before the work
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.sleep(5 * self.interval)  # it records the gap the work ended
        self._stop.set()
        assert self._task is not None
        await self._task
