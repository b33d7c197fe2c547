"""Shared test helpers: real stores that also count the calls they receive, and an
invocation record with every field set."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from acall.dto import (
    RECORD_VERSION,
    CallDTO,
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
    new_invocation_id,
)
from acall.serializers import JsonSerializer
from acall.stores.memory import MemoryStore


def record_with_every_field(call: CallDTO, **changes: Any) -> InvocationRecord:
    """A record of *call* whose every field differs from its default, then *changes*.

    The check below lists each field, so a field added to the record later without a
    value here fails every test that uses this.
    """
    values: dict[str, Any] = {
        "invocation_id": new_invocation_id(),
        "call": call,
        "queue": "q1",
        "status": InvocationStatus.RETRYING,
        "attempt": 2,
        "max_retries": 4,
        "created_at": 100.0,
        "updated_at": 200.0,
        "not_before": 300.0,
        "timeout": 5.0,
        "worker_id": "w-old",
        "dedup_key": "key",
        "error": ErrorInfo("ValueError", "bad", '{"e": 1}', "Traceback ..."),
        "result": '"stale"',
        "v": RECORD_VERSION + 1,
    }
    assert set(values) == {a.name for a in attrs.fields(InvocationRecord)}
    record = InvocationRecord(**values)
    defaults = InvocationRecord(invocation_id="x", call=call)
    for a in attrs.fields(InvocationRecord):
        if a.name not in ("invocation_id", "call"):
            assert getattr(record, a.name) != getattr(defaults, a.name), a.name
    return attrs.evolve(record, **changes)


class CountingStore(MemoryStore):
    """A real in-memory store that records how often each operation reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.keys_fetched: list[str] = []

    async def _put(self, key: str, data: bytes, ttl: float | None) -> None:
        self.calls["put"] += 1
        await super()._put(key, data, ttl)

    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        self.calls["put_many"] += 1
        await super()._put_many(items, ttl)

    async def _get(self, key: str) -> bytes | None:
        self.calls["get"] += 1
        self.keys_fetched.append(key)
        return await super()._get(key)

    async def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls["get_many"] += 1
        self.keys_fetched.extend(keys)
        return await super()._get_many(keys)

    async def _exists(self, key: str) -> bool:
        self.calls["exists"] += 1
        return await super()._exists(key)

    async def _touch_many(self, keys: Sequence[str]) -> list[bool]:
        self.calls["touch_many"] += 1
        return await super()._touch_many(keys)

    def reset(self) -> None:
        self.calls.clear()
        self.keys_fetched.clear()


class CountingSerializer(JsonSerializer):
    """The real JSON serializer, counting dumps/loads calls."""

    def __init__(self) -> None:
        super().__init__()
        self.dumped = 0
        self.loaded = 0

    def dumps(self, obj: Any) -> str:
        self.dumped += 1
        return super().dumps(obj)

    def iter_dumps(self, obj: Any) -> Iterator[str]:
        self.dumped += 1
        return super().iter_dumps(obj)

    def loads(self, text: str) -> Any:
        self.loaded += 1
        return super().loads(text)


def shared_backend_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A broker (and store) URL shared across processes: a fresh SQLite file for
    ``"sqlite"``, an empty Redis database (from the ``redis_url`` fixture) for
    ``"redis"``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'acall.db'}"
    url: str = request.getfixturevalue("redis_url")
    return url
