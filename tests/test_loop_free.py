"""The event loop keeps running while a 100 MB argument is serialized and offloaded.

The strict figure (<= 20 ms longest stall) is measured by ``bench/`` on a quiet
machine; here the property is checked relative to the work done, so a busy CI machine
does not make it flaky: the longest stall must be a small fraction of the whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from acall.calls import Call, LazyCall, TaskSpec
from acall.codec import OffloadCodec
from acall.hashing import REFERENCE_PREFIX
from acall.stores import open_store


def job(payload: Any) -> None: ...


async def _longest_stall(work: Callable[[], Any]) -> tuple[float, float]:
    """Run *work* while a 1 ms heartbeat ticks; return (longest gap, total seconds)."""
    gaps: list[float] = []
    done = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        await work()
        done.set()
    return max(gaps), time.perf_counter() - started


def _big_string() -> str:
    return "lorem ipsum ñ 😀 " * (100 * 1024 * 1024 // 18)


def _big_rows() -> list[dict[str, Any]]:
    return [{"id": i, "name": f"user{i}", "score": i * 0.5, "ok": True} for i in range(1_600_000)]


@pytest.mark.slow
@pytest.mark.parametrize("make", [_big_string, _big_rows], ids=["string", "list_of_dicts"])
async def test_serializing_100mb_keeps_the_loop_free(make: Callable[[], Any]) -> None:
    value = make()
    async with open_store("memory://") as store:
        codec = OffloadCodec(store)
        spec = TaskSpec(job)
        call: Call[Any] = Call.from_args(spec, codec, value)

        async def work() -> None:
            await call.serialize()

        stall, total = await _longest_stall(work)
        ref = call.serialized_arguments["payload"]
        assert ref.startswith(REFERENCE_PREFIX)
        print(f"serialize: longest stall {stall * 1000:.1f} ms of {total * 1000:.0f} ms")
        # A synchronous serializer would stall for the whole duration.
        assert stall < max(0.1, total / 10), (stall, total)
        blob = await store.get(ref)
        assert blob is not None
        assert len(blob) > 90 * 1024 * 1024 or await store.exists(ref + ":0")
        lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, call.to_dto())
        assert (await lazy.argument("payload"))[:3] == value[:3]
