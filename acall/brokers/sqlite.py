"""A broker in one SQLite file, shared by the worker and client processes of one machine.

The file is opened in WAL mode (readers never block the writer) with
``synchronous=NORMAL``. Records and their queue entries share one row::

    acall_invocations(
        id TEXT PRIMARY KEY, queue TEXT, status TEXT,
        record TEXT,          -- the InvocationRecord as DTOCodec JSON
        dedup_key TEXT,       -- the key registered at submission, if any
        seq INTEGER,          -- submission order (a retry gets a new one)
        visible_at REAL,      -- wall-clock time from which the entry may be delivered
        queued INTEGER,       -- 1 while the entry is in its queue (not acknowledged)
        receipt TEXT,         -- the current delivery's receipt, NULL when not in flight
        delivery_count INTEGER,
        final_seq INTEGER,    -- from a counter when the status became final (watch_final)
        updated_at REAL)      -- wall-clock time of the last write (record_ttl)
    acall_dedup(key TEXT PRIMARY KEY, invocation_id TEXT)
    acall_counters(name TEXT PRIMARY KEY, value INTEGER)   -- 'seq' and 'final'

Every write that reads before it writes runs in a ``BEGIN IMMEDIATE`` transaction, which
serialises writers across processes: deduplication is a look-up plus an insert under the
``acall_dedup`` primary key in one such transaction. Receiving is one ``UPDATE ...
RETURNING`` statement that claims the rows, so two consumers never get the same entry
within its visibility window. Times are wall-clock because processes sharing the file
share no monotonic clock. Every SQLite call runs in a worker thread, never on the event
loop.
"""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from typing import Final, TypeVar

import anyio
import anyio.to_thread

from acall.brokers._common import DEFAULT_RECORD_TTL, FINAL_STATUSES, BrokerBase
from acall.brokers.base import Delivery
from acall.dto import InvocationRecord, InvocationStatus
from acall.errors import BrokerError, BrokerUnavailableError, ConfigurationError
from acall.stores.base import store_options, validate_ttl

__all__ = ["SqliteBroker"]

_T = TypeVar("_T")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS acall_invocations ("
    "id TEXT PRIMARY KEY, queue TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL, "
    "dedup_key TEXT, seq INTEGER NOT NULL, visible_at REAL NOT NULL, queued INTEGER NOT NULL, "
    "receipt TEXT, delivery_count INTEGER NOT NULL, final_seq INTEGER, "
    "updated_at REAL NOT NULL)",
    # receive() walks one queue in submission order, skipping entries in flight.
    "CREATE INDEX IF NOT EXISTS acall_invocations_queued "
    "ON acall_invocations (queue, seq) WHERE queued = 1",
    "CREATE INDEX IF NOT EXISTS acall_invocations_final_seq "
    "ON acall_invocations (final_seq) WHERE final_seq IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS acall_invocations_finished "
    "ON acall_invocations (updated_at) WHERE final_seq IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS acall_invocations_status ON acall_invocations (status)",
    "CREATE TABLE IF NOT EXISTS acall_dedup (key TEXT PRIMARY KEY, invocation_id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS acall_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO acall_counters (name, value) VALUES ('seq', 0), ('final', 0)",
)
_FINAL_MARKS: Final = ",".join("?" * len(FINAL_STATUSES))
_INSERT: Final = (
    "INSERT INTO acall_invocations (id, queue, status, record, dedup_key, seq, visible_at, "
    "queued, receipt, delivery_count, final_seq, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 1, NULL, 0, NULL, ?)"
)
_LIVE_DUPLICATE: Final = (
    "SELECT i.id, i.record FROM acall_dedup AS d JOIN acall_invocations AS i "
    f"ON i.id = d.invocation_id WHERE d.key = ? AND i.status NOT IN ({_FINAL_MARKS})"
)
_CLAIM_ONE_QUEUE: Final = (
    "SELECT * FROM (SELECT id, seq FROM acall_invocations "
    "WHERE queued = 1 AND queue = ? AND visible_at <= ? ORDER BY seq LIMIT ?)"
)
# SQLite's default limit on bound parameters was 999 before 3.32; stay well below it.
_IN_CHUNK: Final = 500
_PURGE_INTERVAL: Final = 60.0
_PURGE_BATCH: Final = 1000
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1
_WATCH_POLL: Final = 0.025
_WATCH_BATCH: Final = 1000
_TICK: Final = 1.0
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6

_URL_FORMS: Final = "sqlite:///relative/path.db or sqlite:////absolute/path.db"


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def _bump(conn: sqlite3.Connection, counter: str) -> int:
    row = conn.execute(
        "UPDATE acall_counters SET value = value + 1 WHERE name = ? RETURNING value", (counter,)
    ).fetchone()
    value: int = row[0]
    return value


class _ConnectionPool:
    """SQLite connections lent to worker threads, one thread at a time each.

    ``check_same_thread=False`` is safe because a connection is only ever used by the
    thread that borrowed it, and it lets :meth:`close` close every connection from one
    thread. The capacity limiter of the broker bounds the pool's size.
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
                raise BrokerError(f"broker {self._url} is closed")
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
                f"cannot open SQLite broker {self._url}: directory {parent!r} does not exist; "
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
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn


class SqliteBroker(BrokerBase):
    """A broker in a SQLite file; several processes may share the file.

    :param path: the database file (created if missing; its directory must exist). It
        may be the file of a :class:`~acall.stores.SqliteStore` too: the tables differ.
    :param record_ttl: seconds a finished record is kept (``None``: forever); expired
        rows are deleted in small batches now and then.
    :param lock_timeout: how long an operation keeps retrying while another connection
        (possibly another process) holds the database lock, before it raises
        :class:`~acall.errors.BrokerUnavailableError`.
    :param max_threads: worker threads (and connections) used at once by this broker.
    :ivar path: absolute path of the database file.
    :ivar record_ttl: see the parameter.
    :ivar lock_timeout: see the parameter.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        record_ttl: float | None = DEFAULT_RECORD_TTL,
        lock_timeout: float = 30.0,
        max_threads: int = 4,
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path == ":memory:":
            raise ConfigurationError(
                f"invalid SQLite broker path {path!r}: give a file path ({_URL_FORMS}); "
                "for a process-local broker use memory://"
            )
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
            raise ConfigurationError(f"lock_timeout must be a number, got {lock_timeout!r:.80}")
        if not lock_timeout >= 0:
            raise ConfigurationError(f"lock_timeout must be >= 0 seconds, got {lock_timeout!r}")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ConfigurationError(f"max_threads must be an int >= 1, got {max_threads!r:.80}")
        super().__init__("sqlite:///" + path)
        self.path = os.path.abspath(path)
        self.record_ttl = validate_ttl(record_ttl, what="record_ttl")
        self.lock_timeout = float(lock_timeout)
        # Short waits inside SQLite keep each worker-thread call brief (a cancelled
        # caller waits for its thread); the retry loop in _run covers the rest.
        self._pool = _ConnectionPool(self.path, self.url, min(0.25, self.lock_timeout))
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._next_purge = 0.0

    @classmethod
    def from_url(cls, url: str, **options: object) -> SqliteBroker:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy style).

        Query options: ``record_ttl`` (seconds), ``lock_timeout`` (seconds),
        ``max_threads``; keyword *options* override them.
        """
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(
                f"malformed SQLite broker URL {url!r}: expected {_URL_FORMS} "
                "(three slashes, then the path; four for an absolute path)"
            )
        path, _, query = url[len("sqlite:///") :].partition("?")
        if not path or path == ":memory:" or "#" in path:
            raise ConfigurationError(
                f"malformed SQLite broker URL {url!r}: expected {_URL_FORMS}; "
                "for a process-local broker use memory://"
            )
        merged = store_options(
            url, query, options, {"record_ttl": float, "lock_timeout": float, "max_threads": int}
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
                    raise BrokerUnavailableError(
                        f"SQLite broker {self.url} failed to {what}: {exc}; check that the file "
                        "is an acall database, readable and writable, and that the disk is not "
                        "full"
                    ) from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailableError(
                        f"SQLite broker {self.url} stayed locked for {self.lock_timeout:g} s "
                        f"while trying to {what}; another process holds a long transaction "
                        "on the file (raise lock_timeout if that is expected)"
                    ) from exc
            # Jittered exponential backoff, so processes waiting on the same lock spread out.
            await anyio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, 0.25)

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        # Called inside a write transaction. Deleting in small batches now and then
        # bounds the file's growth without a background task.
        if self.record_ttl is None or now < self._next_purge:
            return
        self._next_purge = now + _PURGE_INTERVAL
        conn.execute(
            "DELETE FROM acall_invocations WHERE rowid IN (SELECT rowid FROM acall_invocations "
            "WHERE final_seq IS NOT NULL AND updated_at <= ? LIMIT ?)",
            (now - self.record_ttl, _PURGE_BATCH),
        )

    # -- backend hooks ---------------------------------------------------------------------

    async def _submit_many(self, records: list[InvocationRecord]) -> list[InvocationRecord]:
        def op(conn: sqlite3.Connection) -> list[InvocationRecord]:
            texts = [self._encode(record) for record in records]
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            (seq,) = conn.execute("SELECT value FROM acall_counters WHERE name = 'seq'").fetchone()
            stored: list[tuple[str, str] | None] = []
            for record, text in zip(records, texts, strict=True):
                invocation_id = record.invocation_id
                row = conn.execute(
                    "SELECT id, record FROM acall_invocations WHERE id = ?", (invocation_id,)
                ).fetchone()
                key = record.dedup_key
                if row is None and key is not None:
                    row = conn.execute(_LIVE_DUPLICATE, (key, *FINAL_STATUSES)).fetchone()
                    if row is None:
                        # Free, or held by a finished invocation: the key is ours now.
                        conn.execute(
                            "INSERT OR REPLACE INTO acall_dedup (key, invocation_id) VALUES (?, ?)",
                            (key, invocation_id),
                        )
                if row is not None:
                    stored.append(row)
                    continue
                seq += 1
                visible_at = now if record.not_before is None else max(now, record.not_before)
                values = (record.queue, record.status.value, text, key, seq, visible_at, now)
                conn.execute(_INSERT, (invocation_id, *values))
                stored.append(None)
            conn.execute("UPDATE acall_counters SET value = ? WHERE name = 'seq'", (seq,))
            conn.execute("COMMIT")
            return [
                record if row is None else self._decode(row[1], row[0])
                for record, row in zip(records, stored, strict=True)
            ]

        return await self._run(op, f"submit {len(records)} invocations")

    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        unique = list(dict.fromkeys(invocation_ids))

        def op(conn: sqlite3.Connection) -> dict[str, InvocationRecord]:
            found: dict[str, InvocationRecord] = {}
            several = len(unique) > _IN_CHUNK
            if several:
                conn.execute("BEGIN")  # one snapshot across the chunked SELECTs
            for chunk in _chunks(unique):
                rows = conn.execute(
                    f"SELECT id, record FROM acall_invocations WHERE id IN "
                    f"({','.join('?' * len(chunk))})",
                    tuple(chunk),
                ).fetchall()
                found.update((row[0], self._decode(row[1], row[0])) for row in rows)
            if several:
                conn.execute("COMMIT")
            return found

        found = await self._run(op, f"read {len(unique)} records")
        return [found.get(invocation_id) for invocation_id in invocation_ids]

    async def _update(self, record: InvocationRecord) -> bool:
        final = record.status.is_final

        def op(conn: sqlite3.Connection) -> bool:
            text = self._encode(record)
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT dedup_key FROM acall_invocations WHERE id = ?", (record.invocation_id,)
            ).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return False
            now = time.time()
            final_seq = None
            if final:
                final_seq = _bump(conn, "final")
                if row[0] is not None:
                    conn.execute(
                        "DELETE FROM acall_dedup WHERE key = ? AND invocation_id = ?",
                        (row[0], record.invocation_id),
                    )
            conn.execute(
                "UPDATE acall_invocations SET status = ?, record = ?, updated_at = ?, "
                "final_seq = ? WHERE id = ?",
                (record.status.value, text, now, final_seq, record.invocation_id),
            )
            if final:
                self._maybe_purge(conn, now)
            conn.execute("COMMIT")
            return True

        return await self._run(op, f"update invocation {record.invocation_id}")

    async def _receive(
        self,
        queues: list[str],
        max_items: int,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        marks = ",".join("?" * len(queues))
        probe = (
            f"SELECT 1 FROM acall_invocations WHERE queued = 1 AND queue IN ({marks}) "
            "AND visible_at <= ? LIMIT 1"
        )
        # One LIMITed subquery per queue, each walking the (queue, seq) index, so a big
        # backlog is never sorted as a whole.
        claim = (
            "UPDATE acall_invocations SET visible_at = ?, receipt = ? || id, "
            "delivery_count = delivery_count + 1 WHERE id IN (SELECT id FROM ("
            + " UNION ALL ".join([_CLAIM_ONE_QUEUE] * len(queues))
            + ") ORDER BY seq LIMIT ?) RETURNING id, queue, receipt, delivery_count, seq"
        )

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            now = time.time()
            # A read first: idle consumers polling an empty queue then never take the
            # write lock that clients need for submitting.
            if conn.execute(probe, (*queues, now)).fetchone() is None:
                return []
            params: list[object] = [now + visibility_timeout, uuid.uuid4().hex + "/"]
            for queue in queues:
                params += [queue, now, max_items]
            params.append(max_items)
            rows = conn.execute(claim, params).fetchall()
            rows.sort(key=lambda row: row[4])  # RETURNING has no defined order
            return [Delivery(row[0], row[1], row[2], row[3]) for row in rows]

        deadline = time.monotonic() + wait
        delay = _POLL_FIRST
        while True:
            taken = await self._run(op, f"receive from {', '.join(queues)}")
            remaining = deadline - time.monotonic()
            if taken or remaining <= 0:
                return taken
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    async def _ack(self, delivery: Delivery) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE acall_invocations SET queued = 0, receipt = NULL "
                "WHERE id = ? AND receipt = ? AND queued = 1",
                (delivery.invocation_id, delivery.receipt),
            )

        await self._run(op, f"acknowledge invocation {delivery.invocation_id}")

    async def _extend(self, deliveries: list[Delivery], visibility_timeout: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            visible_at = time.time() + visibility_timeout
            conn.executemany(
                "UPDATE acall_invocations SET visible_at = ? "
                "WHERE id = ? AND receipt = ? AND queued = 1",
                [(visible_at, d.invocation_id, d.receipt) for d in deliveries],
            )
            conn.execute("COMMIT")

        await self._run(op, f"extend {len(deliveries)} deliveries")

    async def _retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            text = self._encode(record)
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            # A new seq: the retried entry goes to the back of its queue.
            cursor = conn.execute(
                "UPDATE acall_invocations SET status = ?, record = ?, updated_at = ?, "
                "final_seq = NULL, seq = (SELECT value + 1 FROM acall_counters WHERE "
                "name = 'seq'), visible_at = ?, receipt = NULL, delivery_count = 0 "
                "WHERE id = ? AND receipt = ? AND queued = 1",
                (
                    record.status.value,
                    text,
                    now,
                    now + delay,
                    delivery.invocation_id,
                    delivery.receipt,
                ),
            )
            if cursor.rowcount:
                _bump(conn, "seq")
            conn.execute("COMMIT")

        await self._run(op, f"retry invocation {delivery.invocation_id}")

    async def _release(self, deliveries: list[Delivery]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            # visible_at 0 rather than "now": deliverable at once for every process,
            # whatever its clock says; the unchanged seq keeps the entry's place.
            conn.executemany(
                "UPDATE acall_invocations SET visible_at = 0, receipt = NULL "
                "WHERE id = ? AND receipt = ? AND queued = 1",
                [(d.invocation_id, d.receipt) for d in deliveries],
            )
            conn.execute("COMMIT")

        await self._run(op, f"release {len(deliveries)} deliveries")

    async def _watch_final(self) -> AsyncGenerator[set[str], None]:
        def start(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM acall_counters WHERE name = 'final'").fetchone()
            value: int = row[0]
            return value

        def poll(conn: sqlite3.Connection, after: int) -> list[tuple[str, int]]:
            return conn.execute(
                "SELECT id, final_seq FROM acall_invocations WHERE final_seq > ? "
                "ORDER BY final_seq LIMIT ?",
                (after, _WATCH_BATCH),
            ).fetchall()

        what = "watch for finished invocations"
        try:
            last = await self._run(start, what)
            next_tick = time.monotonic() + _TICK
            while not self._closed:
                rows = await self._run(functools.partial(poll, after=last), what)
                if rows:
                    last = rows[-1][1]
                    next_tick = time.monotonic() + _TICK
                    yield {row[0] for row in rows}
                    if len(rows) == _WATCH_BATCH:
                        continue
                elif time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + _TICK
                    yield set()
                await anyio.sleep(_WATCH_POLL)
        except BrokerError:
            # close() may win the race against a poll already under way: end quietly.
            if not self._closed:
                raise

    async def _counts(self) -> dict[InvocationStatus, int]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return conn.execute(
                "SELECT status, COUNT(*) FROM acall_invocations GROUP BY status"
            ).fetchall()

        rows = await self._run(op, "count invocations")
        known = {status.value: status for status in InvocationStatus}
        return {known[value]: count for value, count in rows if value in known}

    async def _pending_count(self, queue: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM acall_invocations WHERE queue = ? AND queued = 1", (queue,)
            ).fetchone()
            count: int = row[0]
            return count

        return await self._run(op, f"count entries of queue {queue!r}")

    async def _close(self) -> None:
        # Closing the last connection checkpoints the WAL: file I/O, so off the loop.
        await anyio.to_thread.run_sync(self._pool.close, limiter=self._limiter)
