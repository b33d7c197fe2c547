"""A process-local data store: a dict, with TTLs expired lazily.

``memory://`` gives a fresh private store; ``memory://name`` gives a store sharing its
data with every other ``memory://name`` store in the process (the data outlives the
store objects, like a named in-process database).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final

from anyio.lowlevel import checkpoint

from acall.errors import ConfigurationError
from acall.stores.base import MiB, Store

__all__ = ["MemoryStore"]

_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class _MemoryData:
    """The shared state behind one or more :class:`MemoryStore` objects."""

    def __init__(self) -> None:
        # A threading lock (not an anyio one): a named store may be used from event
        # loops in several threads, and no critical section ever awaits.
        self.lock = threading.Lock()
        self.entries: dict[str, tuple[bytes, float | None]] = {}
        # Key -> monotonic time of its last write or touch (for delete_idle).
        self.used: dict[str, float] = {}
        # Min-heap of (expires_at, key); entries go stale when a key is overwritten or
        # deleted, and are skipped when popped.
        self.expiries: list[tuple[float, str]] = []

    def purge(self, now: float) -> None:
        """Drop entries whose expiry has passed (lock held)."""
        heap = self.expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry[1] == expires_at:
                del self.entries[key]
                self.used.pop(key, None)

    def set(self, key: str, data: bytes, ttl: float | None, now: float) -> None:
        """Store one entry (lock held)."""
        expires_at = None if ttl is None else now + ttl
        self.entries[key] = (data, expires_at)
        self.used[key] = now
        if expires_at is not None:
            heapq.heappush(self.expiries, (expires_at, key))


_named: dict[str, _MemoryData] = {}
_named_lock = threading.Lock()


class MemoryStore(Store):
    """A store in this process's memory; nothing leaves the process.

    :param name: share data with every other store of that name in the process;
        ``None`` gives a private store whose data is dropped on :meth:`close`.
    :param ttl: default expiry in seconds for puts that pass ``ttl=None``.
    :param max_value_size: largest accepted value (default 1 GiB).
    :ivar name: the shared name, or ``None`` for a private store.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        ttl: float | None = None,
        max_value_size: int = 1024 * MiB,
    ) -> None:
        if name is None:
            data = _MemoryData()
            url = "memory://"
        else:
            if not name or not isinstance(name, str) or not set(name) <= _NAME_CHARS:
                raise ConfigurationError(
                    f"invalid memory store name {name!r:.80}: use letters, digits, "
                    "'_', '.' and '-' (for example memory://results)"
                )
            with _named_lock:
                data = _named.setdefault(name, _MemoryData())
            url = f"memory://{name}"
        super().__init__(url, max_value_size=max_value_size, default_ttl=ttl)
        self.name = name
        self._data = data

    @staticmethod
    def drop(name: str) -> bool:
        """Forget the shared data of ``memory://name``; return whether it existed.

        Stores still open on that name keep the old data; new ones start empty.
        """
        with _named_lock:
            return _named.pop(name, None) is not None

    async def _put(self, key: str, data: bytes, ttl: float | None) -> None:
        await checkpoint()
        now = time.monotonic()
        with self._data.lock:
            self._data.purge(now)
            self._data.set(key, data, ttl, now)

    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        await checkpoint()
        now = time.monotonic()
        with self._data.lock:
            self._data.purge(now)
            for key, data in items.items():
                self._data.set(key, data, ttl, now)

    async def _get(self, key: str) -> bytes | None:
        return (await self._get_many([key]))[0]

    async def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        await checkpoint()
        with self._data.lock:
            self._data.purge(time.monotonic())
            entries = self._data.entries
            return [entry[0] if (entry := entries.get(key)) is not None else None for key in keys]

    async def _exists(self, key: str) -> bool:
        return (await self._exists_many([key]))[0]

    async def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        await checkpoint()
        with self._data.lock:
            self._data.purge(time.monotonic())
            return [key in self._data.entries for key in keys]

    async def _delete(self, keys: Sequence[str]) -> int:
        await checkpoint()
        with self._data.lock:
            self._data.purge(time.monotonic())
            entries = self._data.entries
            for key in keys:
                self._data.used.pop(key, None)
            return sum(entries.pop(key, None) is not None for key in keys)

    async def _touch_many(self, keys: Sequence[str]) -> list[bool]:
        await checkpoint()
        now = time.monotonic()
        with self._data.lock:
            self._data.purge(now)
            found = []
            for key in keys:
                present = key in self._data.entries
                if present:
                    self._data.used[key] = now
                found.append(present)
            return found

    async def _delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        await checkpoint()
        now = time.monotonic()
        with self._data.lock:
            self._data.purge(now)
            data = self._data
            gone = [
                key
                for key in keys
                if key in data.entries and now - data.used.get(key, -math.inf) >= idle
            ]
            for key in gone:
                del data.entries[key]
                data.used.pop(key, None)
            return gone

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        await checkpoint()
        with self._data.lock:
            self._data.purge(time.monotonic())
            # A snapshot, so callers may delete while iterating.
            keys = [key for key in self._data.entries if key.startswith(prefix)]
        for key in keys:
            yield key

    async def _close(self) -> None:
        await checkpoint()
        if self.name is None:
            with self._data.lock:
                self._data.entries.clear()
                self._data.used.clear()
                self._data.expiries.clear()
