"""Watching the event loop for stalls while a backend works (its blocking work must run
off the loop): a heartbeat ticks beside the work and the longest gap between ticks is
what the loop waited.

The cyclic garbage collector is paused while it runs: a full collection of a test
process's heap (hundreds of thousands of objects once many tests have run) holds the
loop for 100 ms and more on a slow machine, which is not the backend blocking it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable

import anyio


async def longest_gap(work: Callable[[], Awaitable[object]], tick: float = 0.002) -> list[float]:
    """Run *work* beside a heartbeat ticking every *tick* seconds; return the gaps
    between ticks (their maximum is the longest stall)."""
    gaps: list[float] = []
    done = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(tick)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    gc.collect()
    gc.disable()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await anyio.sleep(0.01)
            await work()
            done.set()
    finally:
        gc.enable()
    return gaps
