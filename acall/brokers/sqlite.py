"""A broker in one SQLite file, shared by the worker and client processes of one machine.

The file is opened in WAL mode (readers never block the writer) with
``synchronous=NORMAL``. Records and their queue entries share one row::

    acall_invocations(
        id TEXT PRIMARY KEY, queue TEXT, status TEXT,
        record TEXT,          -- the InvocationRecord as DTOCodec JSON
        dedup_key TEXT,       -- the key registered at submission, if any
        call_key TEXT,        -- the call's key (CallId.key), for find_by_call()
        created_seq INTEGER,  -- submission order, never changed (find_by_call's order)
        seq INTEGER,          -- queue order: the submission's, or a retry's newer one
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
``acall_dedup`` primary key in one such transaction. Receiving claims rows with one
``UPDATE ... RETURNING`` statement, so two consumers never get the same entry within
its visibility window, and marks the claimed invocations RUNNING in the same
transaction; :meth:`~SqliteBroker.finish` records a whole batch of outcomes and acks in
one transaction too. Times are wall-clock because processes sharing the file share no
monotonic clock. Every SQLite call runs in a worker thread, never on the event loop.

There is no schema migration: a file written by an earlier development version of this
broker (without ``call_key``) must be deleted.
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final, TypeVar

import anyio

from acall._sqlite import IN_CHUNK, SqliteRunner, check_file_settings, chunks, split_url
from acall.brokers._common import DEFAULT_RECORD_TTL, FINAL_STATUSES, BrokerBase
from acall.brokers.base import Delivery, ScannedRecord, make_delivery
from acall.dto import InvocationRecord, InvocationStatus, claimed
from acall.errors import BrokerError, BrokerUnavailableError
from acall.stores.base import store_options, validate_ttl

__all__ = ["SqliteBroker"]

_T = TypeVar("_T")
_Read = TypeVar("_Read", InvocationRecord, InvocationRecord | InvocationStatus)

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS acall_invocations ("
    "id TEXT PRIMARY KEY, queue TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL, "
    "dedup_key TEXT, call_key TEXT NOT NULL, created_seq INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, visible_at REAL NOT NULL, queued INTEGER NOT NULL, "
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
    # find_by_call(): the invocations of one call, oldest first.
    "CREATE INDEX IF NOT EXISTS acall_invocations_call "
    "ON acall_invocations (call_key, created_seq)",
    "CREATE TABLE IF NOT EXISTS acall_dedup (key TEXT PRIMARY KEY, invocation_id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS acall_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO acall_counters (name, value) VALUES ('seq', 0), ('final', 0)",
)
_FINAL_MARKS: Final = ",".join("?" * len(FINAL_STATUSES))
_INSERT: Final = (
    "INSERT INTO acall_invocations (id, queue, status, record, dedup_key, call_key, "
    "created_seq, seq, visible_at, queued, receipt, delivery_count, final_seq, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, 0, NULL, ?)"
)
_LIVE_DUPLICATE: Final = (
    "SELECT i.id, i.record FROM acall_dedup AS d JOIN acall_invocations AS i "
    f"ON i.id = d.invocation_id WHERE d.key = ? AND i.status NOT IN ({_FINAL_MARKS})"
)
_CLAIM_ONE_QUEUE: Final = (
    "SELECT * FROM (SELECT id, seq FROM acall_invocations "
    "WHERE queued = 1 AND queue = ? AND visible_at <= ? ORDER BY seq LIMIT ?)"
)
_SET_RECORD: Final = (
    "UPDATE acall_invocations SET status = ?, record = ?, updated_at = ? WHERE id = ?"
)
_SET_FINAL: Final = (
    "UPDATE acall_invocations SET status = ?, record = ?, updated_at = ?, final_seq = ? "
    "WHERE id = ?"
)
_RELEASE_DEDUP: Final = "DELETE FROM acall_dedup WHERE key = ? AND invocation_id = ?"
_ACK: Final = (
    "UPDATE acall_invocations SET queued = 0, receipt = NULL "
    "WHERE id = ? AND receipt = ? AND queued = 1"
)
_PURGE_INTERVAL: Final = 60.0
_PURGE_BATCH: Final = 1000
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1
_WATCH_POLL: Final = 0.025
_WATCH_BATCH: Final = 1000
_TICK: Final = 1.0


def _bump(conn: sqlite3.Connection, counter: str) -> int:
    row = conn.execute(
        "UPDATE acall_counters SET value = value + 1 WHERE name = ? RETURNING value", (counter,)
    ).fetchone()
    value: int = row[0]
    return value


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
        path = check_file_settings(path, lock_timeout, max_threads, "broker")
        super().__init__("sqlite:///" + path)
        self.path = os.path.abspath(path)
        self.record_ttl = validate_ttl(record_ttl, what="record_ttl")
        self.lock_timeout = float(lock_timeout)
        self._db = SqliteRunner(
            self.path,
            self.url,
            kind="broker",
            schema=_SCHEMA,
            schema_in_transaction=True,
            lock_timeout=self.lock_timeout,
            max_threads=max_threads,
            error=BrokerError,
            unavailable=BrokerUnavailableError,
        )
        self._next_purge = 0.0

    @classmethod
    def from_url(cls, url: str, **options: object) -> SqliteBroker:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy style).

        Query options: ``record_ttl`` (seconds), ``lock_timeout`` (seconds),
        ``max_threads``; keyword *options* override them.
        """
        path, query = split_url(url, "broker")
        merged = store_options(
            url,
            query,
            options,
            {"record_ttl": float, "lock_timeout": float, "max_threads": int},
            what="broker",
        )
        return cls(path, **merged)  # type: ignore[arg-type]

    # -- running SQLite calls off the event loop -------------------------------------------

    async def _run(self, op: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run *op* in a worker thread, retrying while the database is locked.

        Every call is one worker-thread call and (at most) one transaction.
        """
        return await self._db.run(op, what)

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
                values = (record.queue, record.status.value, text, key, record.call_id.key)
                conn.execute(_INSERT, (invocation_id, *values, seq, seq, visible_at, now))
                stored.append(None)
            conn.execute("UPDATE acall_counters SET value = ? WHERE name = 'seq'", (seq,))
            conn.execute("COMMIT")
            return [
                record if row is None else self._decode(row[1], row[0])
                for record, row in zip(records, stored, strict=True)
            ]

        return await self._run(op, f"submit {len(records)} invocations")

    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        return await self._read(invocation_ids, self._decode)

    async def _get_final_many(
        self, invocation_ids: list[str]
    ) -> list[InvocationRecord | InvocationStatus | None]:
        return await self._read(invocation_ids, self._decode_unless_live)

    async def _read(
        self, invocation_ids: list[str], decode: Callable[[str, str], _Read]
    ) -> list[_Read | None]:
        """``decode(record text, id)`` for each of *invocation_ids*, ``None`` if unknown."""
        unique = list(dict.fromkeys(invocation_ids))

        def op(conn: sqlite3.Connection) -> dict[str, _Read]:
            found: dict[str, _Read] = {}
            several = len(unique) > IN_CHUNK
            if several:
                conn.execute("BEGIN")  # one snapshot across the chunked SELECTs
            for chunk in chunks(unique):
                rows = conn.execute(
                    f"SELECT id, record FROM acall_invocations WHERE id IN "
                    f"({','.join('?' * len(chunk))})",
                    tuple(chunk),
                ).fetchall()
                found.update((row[0], decode(row[1], row[0])) for row in rows)
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
                    conn.execute(_RELEASE_DEDUP, (row[0], record.invocation_id))
            conn.execute(
                _SET_FINAL, (record.status.value, text, now, final_seq, record.invocation_id)
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
            + ") ORDER BY seq LIMIT ?) "
            "RETURNING id, queue, receipt, delivery_count, seq, record"
        )
        running = InvocationStatus.RUNNING

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            # A read first: idle consumers polling an empty queue then never take the
            # write lock that clients need for submitting.
            if conn.execute(probe, (*queues, time.time())).fetchone() is None:
                return []
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            params: list[object] = [now + visibility_timeout, uuid.uuid4().hex + "/"]
            for queue in queues:
                params += [queue, now, max_items]
            params.append(max_items)
            rows = conn.execute(claim, params).fetchall()
            rows.sort(key=lambda row: row[4])  # RETURNING has no defined order
            deliveries: list[Delivery] = []
            changes: list[tuple[str, str, float, str]] = []
            for invocation_id, queue, receipt, count, _, text in rows:
                record = self._decode_claimed(text, invocation_id)
                if record is not None and not record.status.is_final:
                    record = claimed(record, consumer, now)
                    changes.append((running.value, self._encode(record), now, invocation_id))
                deliveries.append(make_delivery(invocation_id, queue, receipt, count, record))
            conn.executemany(_SET_RECORD, changes)
            conn.execute("COMMIT")
            return deliveries

        deadline = time.monotonic() + wait
        delay = _POLL_FIRST
        while True:
            taken = await self._run(op, f"receive from {', '.join(queues)}")
            remaining = deadline - time.monotonic()
            if taken or remaining <= 0:
                return taken
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        ids = list(dict.fromkeys(delivery.invocation_id for delivery, _ in outcomes))

        def op(conn: sqlite3.Connection) -> None:
            texts = [self._encode(record) for _, record in outcomes]
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            # Invocation id -> (status, dedup key) as stored, kept current while the
            # batch is applied, so that within a batch the first outcome wins too.
            stored: dict[str, tuple[str, str | None]] = {}
            for chunk in chunks(ids):
                rows = conn.execute(
                    "SELECT id, status, dedup_key FROM acall_invocations WHERE id IN "
                    f"({','.join('?' * len(chunk))})",
                    tuple(chunk),
                ).fetchall()
                stored.update((row[0], (row[1], row[2])) for row in rows)
            row = conn.execute("SELECT value FROM acall_counters WHERE name = 'final'").fetchone()
            final_seq: int = row[0]
            writes: list[tuple[str, str, float, int, str]] = []
            releases: list[tuple[str, str]] = []
            for (_, record), text in zip(outcomes, texts, strict=True):
                invocation_id = record.invocation_id
                found = stored.get(invocation_id)
                if found is None or found[0] in FINAL_STATUSES:
                    continue  # unknown (or expired), or an outcome is recorded already
                dedup_key = found[1]
                final_seq += 1
                writes.append((record.status.value, text, now, final_seq, invocation_id))
                if dedup_key is not None:
                    releases.append((dedup_key, invocation_id))
                stored[invocation_id] = (record.status.value, dedup_key)
            if writes:
                conn.executemany(_SET_FINAL, writes)
                conn.executemany(_RELEASE_DEDUP, releases)
                conn.execute(
                    "UPDATE acall_counters SET value = ? WHERE name = 'final'", (final_seq,)
                )
            conn.executemany(_ACK, [(d.invocation_id, d.receipt) for d, _ in outcomes])
            if writes:
                self._maybe_purge(conn, now)
            conn.execute("COMMIT")

        await self._run(op, f"finish {len(outcomes)} invocations")

    async def _find_by_call(self, call_key: str, limit: int) -> list[InvocationRecord]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return conn.execute(
                "SELECT id, record FROM acall_invocations WHERE call_key = ? "
                "ORDER BY created_seq LIMIT ?",
                (call_key, limit),
            ).fetchall()

        rows = await self._run(op, f"find invocations of call {call_key!r}")
        return [self._decode(text, invocation_id) for invocation_id, text in rows]

    async def _ack(self, delivery: Delivery) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_ACK, (delivery.invocation_id, delivery.receipt))

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

    async def _release(
        self, deliveries: list[Delivery], records: list[InvocationRecord | None]
    ) -> None:
        waiting = [
            (r.status.value, self._encode(r), r.updated_at, d.invocation_id, d.receipt)
            for d, r in zip(deliveries, records, strict=True)
            if r is not None
        ]

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            # Records first, while the receipts still name the deliveries that claimed them.
            conn.executemany(
                "UPDATE acall_invocations SET status = ?, record = ?, updated_at = ? "
                "WHERE id = ? AND receipt = ? AND queued = 1 AND status = 'running'",
                waiting,
            )
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
            yield set()  # subscribed: see Broker.watch_final
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

    async def _scan_records(self, batch_size: int) -> AsyncIterator[list[ScannedRecord]]:
        after = ""
        while True:

            def op(conn: sqlite3.Connection, after: str = after) -> list[tuple[str, str]]:
                # Finished records past their record_ttl are skipped even before the
                # next purge deletes them: nothing may rely on them any more.
                kept_since = -math.inf if self.record_ttl is None else time.time() - self.record_ttl
                return conn.execute(
                    "SELECT id, record FROM acall_invocations WHERE id > ? "
                    "AND (final_seq IS NULL OR updated_at > ?) ORDER BY id LIMIT ?",
                    (after, kept_since, batch_size),
                ).fetchall()

            # Page by id so no read transaction stays open while the caller works.
            rows = await self._run(op, "scan records")
            yield [self._decode_scanned(text, invocation_id) for invocation_id, text in rows]
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

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
        await self._db.close()
