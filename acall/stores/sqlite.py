"""A data store in one SQLite file, shareable by several processes on one machine.

The file is opened in WAL mode (readers never block the writer), with
``synchronous=NORMAL`` (durable across process crashes; a power loss may drop the last
commits, which an offload cache tolerates). Values live in one table::

    acall_blobs(key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL, used_at REAL)

``expires_at`` and ``used_at`` (last write or touch, for :meth:`SqliteStore.delete_idle`)
are wall-clock Unix time, because processes sharing the file share no
monotonic clock. Every SQLite call runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Final, TypeVar

from acall._sqlite import IN_CHUNK, SqliteRunner, check_file_settings, chunks, split_url
from acall.errors import StoreError, StoreUnavailableError
from acall.stores.base import MiB, Store, store_options

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS acall_blobs ("
    "key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL, used_at REAL)",
    "CREATE INDEX IF NOT EXISTS acall_blobs_expires_at ON acall_blobs (expires_at) "
    "WHERE expires_at IS NOT NULL",
)
_LIVE: Final = "(expires_at IS NULL OR expires_at > ?)"
_INSERT: Final = (
    "INSERT OR REPLACE INTO acall_blobs (key, value, expires_at, used_at) VALUES (?, ?, ?, ?)"
)
_SCAN_PAGE: Final = 1000
_PURGE_INTERVAL: Final = 60.0
_PURGE_BATCH: Final = 1000


def _add_used_at(conn: sqlite3.Connection) -> None:
    # Files written before used_at existed get the column; their rows count as idle
    # since forever (NULL), which only matters to delete_idle.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(acall_blobs)")}
    if "used_at" not in columns:
        try:
            conn.execute("ALTER TABLE acall_blobs ADD COLUMN used_at REAL")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise


def _placeholders(count: int) -> str:
    # Only "?" characters reach the SQL text; the keys themselves are always bound.
    return ",".join("?" * count)


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
        path = check_file_settings(path, lock_timeout, max_threads, "store")
        super().__init__("sqlite:///" + path, max_value_size=max_value_size, default_ttl=ttl)
        self.path = os.path.abspath(path)
        self.lock_timeout = float(lock_timeout)
        self._db = SqliteRunner(
            self.path,
            self.url,
            kind="store",
            schema=_SCHEMA,
            schema_in_transaction=False,
            lock_timeout=self.lock_timeout,
            max_threads=max_threads,
            error=StoreError,
            unavailable=StoreUnavailableError,
        )
        self._next_purge = 0.0
        self._upgraded = False

    @classmethod
    def from_url(cls, url: str, **options: object) -> SqliteStore:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy style).

        Query options: ``ttl`` (default expiry, seconds), ``lock_timeout`` (seconds),
        ``max_threads``, ``max_value_size``; keyword *options* override them.
        """
        path, query = split_url(url, "store")
        merged = store_options(
            url,
            query,
            options,
            {"ttl": float, "lock_timeout": float, "max_threads": int, "max_value_size": int},
        )
        return cls(path, **merged)  # type: ignore[arg-type]

    # -- running SQLite calls off the event loop -------------------------------------------

    async def _run(self, op: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run *op* in a worker thread, retrying while the database is locked."""
        if not self._upgraded:
            await self._db.run(_add_used_at, "upgrade the blob table")
            self._upgraded = True
        return await self._db.run(op, what)

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
            conn.execute(_INSERT, (key, data, expires_at, now))
            self._maybe_purge(conn, now)

        await self._run(op, f"put {key!r}")

    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so the busy timeout applies here
            # instead of failing later when a read lock would need upgrading.
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            conn.executemany(_INSERT, [(key, data, expires_at, now) for key, data in items.items()])
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
            several = len(unique) > IN_CHUNK
            if several:
                conn.execute("BEGIN")  # one snapshot across the chunked SELECTs
            for chunk in chunks(unique):
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
            for chunk in chunks(unique):
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
            for chunk in chunks(keys):
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

    async def _touch_many(self, keys: Sequence[str]) -> list[bool]:
        unique = list(dict.fromkeys(keys))

        def op(conn: sqlite3.Connection) -> set[str]:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            present: set[str] = set()
            for chunk in chunks(unique):
                marks = _placeholders(len(chunk))
                # No RETURNING: it needs SQLite 3.35, newer than some systems ship.
                conn.execute(
                    f"UPDATE acall_blobs SET used_at = ? WHERE key IN ({marks}) AND {_LIVE}",
                    (now, *chunk, now),
                )
                rows = conn.execute(
                    f"SELECT key FROM acall_blobs WHERE key IN ({marks}) AND {_LIVE}",
                    (*chunk, now),
                )
                present.update(key for (key,) in rows)
            conn.execute("COMMIT")
            return present

        present = await self._run(op, f"touch {len(unique)} keys")
        return [key in present for key in keys]

    async def _delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")
            cutoff = time.time() - idle
            gone: list[str] = []
            for chunk in chunks(keys):
                marks = _placeholders(len(chunk))
                idle_rows = f"key IN ({marks}) AND (used_at IS NULL OR used_at <= ?)"
                # Inside one write transaction, so no touch lands between the two.
                found = [
                    key
                    for (key,) in conn.execute(
                        f"SELECT key FROM acall_blobs WHERE {idle_rows}", (*chunk, cutoff)
                    )
                ]
                conn.execute(f"DELETE FROM acall_blobs WHERE {idle_rows}", (*chunk, cutoff))
                gone.extend(found)
            conn.execute("COMMIT")
            return gone

        return await self._run(op, f"delete idle among {len(keys)} keys")

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
        await self._db.close()
