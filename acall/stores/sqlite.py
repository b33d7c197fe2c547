"""A data store in one SQLite file, shareable by several processes on one machine.

The file is opened in WAL mode (readers never block the writer), with
``synchronous=NORMAL`` (durable across process crashes; a power loss may drop the last
commits, which an offload cache tolerates). Values live in one table::

    acall_blobs(key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL)

``expires_at`` is wall-clock Unix time, because processes sharing the file share no
monotonic clock. Every SQLite call runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Final, TypeVar

import anyio
import anyio.to_thread

from acall.errors import ConfigurationError, StoreError, StoreUnavailableError
from acall.stores.base import MiB, Store, store_options

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS acall_blobs ("
    "key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL)",
    "CREATE INDEX IF NOT EXISTS acall_blobs_expires_at ON acall_blobs (expires_at) "
    "WHERE expires_at IS NOT NULL",
)
_LIVE: Final = "(expires_at IS NULL OR expires_at > ?)"
_INSERT: Final = "INSERT OR REPLACE INTO acall_blobs (key, value, expires_at) VALUES (?, ?, ?)"
# SQLite's default limit on bound parameters was 999 before 3.32; stay well below it.
_IN_CHUNK: Final = 500
_SCAN_PAGE: Final = 1000
_PURGE_INTERVAL: Final = 60.0
_PURGE_BATCH: Final = 1000
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6

_URL_FORMS: Final = "sqlite:///relative/path.db or sqlite:////absolute/path.db"


def _placeholders(count: int) -> str:
    # Only "?" characters reach the SQL text; the keys themselves are always bound.
    return ",".join("?" * count)


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


class _ConnectionPool:
    """SQLite connections handed to worker threads one at a time.

    Connections are opened with ``check_same_thread=False`` and each is used by at
    most one thread at a time (borrowed under a lock, returned after the call). That is
    safe because the sqlite3 module is built thread-safe (``sqlite3.threadsafety``), and
    unlike ``threading.local`` it lets :meth:`close` close every connection from one
    thread instead of leaking the ones owned by idle worker threads. The capacity
    limiter bounds the pool to one connection per concurrent worker thread.
    """

    def __init__(self, path: str, url: str, busy_timeout: float) -> None:
        self._path = path
        self._url = url
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._schema_ready = False

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self._url} is closed")
            if self._idle:
                return self._idle.pop()
        return self._open()

    def release(self, conn: sqlite3.Connection, *, discard: bool) -> None:
        with self._lock:
            if not discard and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        parent = os.path.dirname(self._path)
        if not os.path.isdir(parent):
            raise ConfigurationError(
                f"cannot open SQLite store {self._url}: directory {parent!r} does not exist; "
                "create it first (acall does not create directories)"
            )
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN ... COMMIT
            check_same_thread=False,
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if not self._schema_ready:
                for statement in _SCHEMA:
                    conn.execute(statement)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn


class SqliteStore(Store):
    """A store in a SQLite file; several processes may share the file.

    :param path: the database file (created if missing; its directory must exist).
    :param ttl: default expiry in seconds for puts that pass ``ttl=None``.
    :param lock_timeout: how long an operation keeps retrying while another connection
        (possibly another process) holds the database lock, before it raises
        :class:`~acall.errors.StoreUnavailableError`.
    :param max_threads: worker threads (and connections) used at once by this store.
    :param max_value_size: largest accepted value (default 256 MiB).
    :ivar path: absolute path of the database file (a relative *path* is resolved
        against the working directory at construction).
    :ivar lock_timeout: see the parameter.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        lock_timeout: float = 30.0,
        max_threads: int = 4,
        max_value_size: int = 256 * MiB,
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path == ":memory:":
            raise ConfigurationError(
                f"invalid SQLite store path {path!r}: give a file path ({_URL_FORMS}); "
                "for a process-local store use memory://"
            )
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
            raise ConfigurationError(f"lock_timeout must be a number, got {lock_timeout!r:.80}")
        if not lock_timeout >= 0:
            raise ConfigurationError(f"lock_timeout must be >= 0 seconds, got {lock_timeout!r}")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ConfigurationError(f"max_threads must be an int >= 1, got {max_threads!r:.80}")
        super().__init__("sqlite:///" + path, max_value_size=max_value_size, default_ttl=ttl)
        self.path = os.path.abspath(path)
        self.lock_timeout = float(lock_timeout)
        # Short per-attempt waits inside SQLite keep each worker-thread call brief (a
        # cancelled caller waits for its thread); the retry loop below covers the rest.
        busy_timeout = min(0.25, self.lock_timeout)
        self._pool = _ConnectionPool(self.path, self.url, busy_timeout)
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._next_purge = 0.0

    @classmethod
    def from_url(cls, url: str, **options: object) -> SqliteStore:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy style).

        Query options: ``ttl`` (default expiry, seconds), ``lock_timeout`` (seconds),
        ``max_threads``, ``max_value_size``; keyword *options* override them.
        """
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(
                f"malformed SQLite store URL {url!r}: expected {_URL_FORMS} "
                "(three slashes, then the path; four for an absolute path)"
            )
        rest = url[len("sqlite:///") :]
        path, _, query = rest.partition("?")
        if not path or path == ":memory:" or "#" in path:
            raise ConfigurationError(
                f"malformed SQLite store URL {url!r}: expected {_URL_FORMS}; "
                "for a process-local store use memory://"
            )
        merged = store_options(
            url,
            query,
            options,
            {"ttl": float, "lock_timeout": float, "max_threads": int, "max_value_size": int},
        )
        return cls(path, **merged)  # type: ignore[arg-type]

    # -- running SQLite calls off the event loop -------------------------------------------

    def _call(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *op* with a pooled connection (in a worker thread)."""
        conn = self._pool.acquire()
        discard = False
        try:
            return op(conn)
        except sqlite3.Error as exc:
            discard = not _is_busy(exc)
            raise
        finally:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    discard = True
            self._pool.release(conn, discard=discard)

    async def _run(self, op: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run *op* in a worker thread, retrying while the database is locked."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.01
        while True:
            try:
                return await anyio.to_thread.run_sync(self._call, op, limiter=self._limiter)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise StoreUnavailableError(
                        f"SQLite store {self.url} failed to {what}: {exc}; check that the file "
                        "is an acall store, readable and writable, and that the disk is not "
                        "full"
                    ) from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreUnavailableError(
                        f"SQLite store {self.url} stayed locked for {self.lock_timeout:g} s "
                        f"while trying to {what}; another process holds a long transaction "
                        "on the file (raise lock_timeout if that is expected)"
                    ) from exc
            # Jittered exponential backoff, so processes waiting on the same lock spread out.
            await anyio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, 0.25)

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        # Expired rows are invisible to reads already; deleting them in small batches
        # now and then bounds the file's growth without a background task.
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_INTERVAL
        conn.execute(
            "DELETE FROM acall_blobs WHERE rowid IN (SELECT rowid FROM acall_blobs "
            "WHERE expires_at <= ? LIMIT ?)",
            (now, _PURGE_BATCH),
        )

    # -- backend hooks ---------------------------------------------------------------------

    async def _put(self, key: str, data: bytes, ttl: float | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            # One autocommit statement: readers see the old row or the new one, never half.
            conn.execute(_INSERT, (key, data, expires_at))
            self._maybe_purge(conn, now)

        await self._run(op, f"put {key!r}")

    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so the busy timeout applies here
            # instead of failing later when a read lock would need upgrading.
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            conn.executemany(_INSERT, [(key, data, expires_at) for key, data in items.items()])
            self._maybe_purge(conn, now)
            conn.execute("COMMIT")

        await self._run(op, f"put {len(items)} values")

    async def _get(self, key: str) -> bytes | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                f"SELECT value FROM acall_blobs WHERE key = ? AND {_LIVE}", (key, time.time())
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(op, f"get {key!r}")

    async def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        unique = list(dict.fromkeys(keys))

        def op(conn: sqlite3.Connection) -> dict[str, bytes]:
            now = time.time()
            found: dict[str, bytes] = {}
            several = len(unique) > _IN_CHUNK
            if several:
                conn.execute("BEGIN")  # one snapshot across the chunked SELECTs
            for chunk in _chunks(unique):
                rows = conn.execute(
                    f"SELECT key, value FROM acall_blobs "
                    f"WHERE key IN ({_placeholders(len(chunk))}) AND {_LIVE}",
                    (*chunk, now),
                )
                found.update((key, bytes(value)) for key, value in rows)
            if several:
                conn.execute("COMMIT")
            return found

        found = await self._run(op, f"get {len(unique)} values")
        return [found.get(key) for key in keys]

    async def _exists(self, key: str) -> bool:
        return (await self._exists_many([key]))[0]

    async def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        unique = list(dict.fromkeys(keys))

        def op(conn: sqlite3.Connection) -> set[str]:
            now = time.time()
            present: set[str] = set()
            for chunk in _chunks(unique):
                rows = conn.execute(
                    f"SELECT key FROM acall_blobs "
                    f"WHERE key IN ({_placeholders(len(chunk))}) AND {_LIVE}",
                    (*chunk, now),
                )
                present.update(key for (key,) in rows)
            return present

        present = await self._run(op, f"check {len(unique)} keys")
        return [key in present for key in keys]

    async def _delete(self, keys: Sequence[str]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            deleted = 0
            for chunk in _chunks(keys):
                marks = _placeholders(len(chunk))
                # Count only live rows: an expired value was already gone for readers.
                cursor = conn.execute(
                    f"DELETE FROM acall_blobs WHERE key IN ({marks}) AND {_LIVE}", (*chunk, now)
                )
                deleted += cursor.rowcount
                conn.execute(f"DELETE FROM acall_blobs WHERE key IN ({marks})", tuple(chunk))
            conn.execute("COMMIT")
            return deleted

        return await self._run(op, f"delete {len(keys)} keys")

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        # The prefix holds only key characters, none of which GLOB treats specially.
        pattern = prefix + "*"
        after = ""
        while True:

            def op(conn: sqlite3.Connection, after: str = after) -> list[str]:
                rows = conn.execute(
                    f"SELECT key FROM acall_blobs WHERE key GLOB ? AND key > ? AND {_LIVE} "
                    "ORDER BY key LIMIT ?",
                    (pattern, after, time.time(), _SCAN_PAGE),
                )
                return [key for (key,) in rows]

            # Page by key so no read transaction stays open while the caller iterates.
            page = await self._run(op, f"scan prefix {prefix!r}")
            for key in page:
                yield key
            if len(page) < _SCAN_PAGE:
                return
            after = page[-1]

    async def _close(self) -> None:
        # Closing the last connection checkpoints the WAL: file I/O, so off the loop.
        await anyio.to_thread.run_sync(self._pool.close, limiter=self._limiter)
