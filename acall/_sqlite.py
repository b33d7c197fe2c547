"""SQLite plumbing shared by :class:`~acall.stores.SqliteStore` and
:class:`~acall.brokers.SqliteBroker`.

Both keep their data in a SQLite file that several processes may share, and both need
the same things: URL and settings checks, a pool of connections lent to worker threads,
and a runner that calls SQLite off the event loop while retrying for as long as another
connection (possibly another process) holds the database lock.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

import anyio
import anyio.to_thread

from acall.errors import AcallError, ConfigurationError

__all__ = [
    "IN_CHUNK",
    "URL_FORMS",
    "ConnectionPool",
    "SqliteRunner",
    "check_file_settings",
    "chunks",
    "is_busy",
    "split_url",
]

_T = TypeVar("_T")

#: The URL forms every SQLite backend accepts (for error messages).
URL_FORMS: Final = "sqlite:///relative/path.db or sqlite:////absolute/path.db"

#: Most ids bound in one ``IN (...)`` list: SQLite's default limit on bound parameters
#: was 999 before 3.32; stay well below it.
IN_CHUNK: Final = 500

_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_BACKOFF_FIRST: Final = 0.01
_BACKOFF_MAX: Final = 0.25


def chunks(items: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    """Consecutive slices of *items* of at most *size* elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether *exc* means "another connection holds the lock" (worth retrying)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def check_file_settings(
    path: str | os.PathLike[str], lock_timeout: object, max_threads: object, kind: str
) -> str:
    """Check a SQLite backend's constructor arguments; return *path* as a str.

    :param kind: ``"store"`` or ``"broker"``, for the messages.
    :raises ConfigurationError: naming the bad argument.
    """
    path = os.fspath(path)
    if not isinstance(path, str) or not path or path == ":memory:":
        raise ConfigurationError(
            f"invalid SQLite {kind} path {path!r}: give a file path ({URL_FORMS}); "
            f"for a process-local {kind} use memory://"
        )
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
        raise ConfigurationError(f"lock_timeout must be a number, got {lock_timeout!r:.80}")
    if not lock_timeout >= 0:
        raise ConfigurationError(f"lock_timeout must be >= 0 seconds, got {lock_timeout!r}")
    if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
        raise ConfigurationError(f"max_threads must be an int >= 1, got {max_threads!r:.80}")
    return path


def split_url(url: str, kind: str) -> tuple[str, str]:
    """Split ``sqlite:///relative.db?query`` (or ``sqlite:////absolute.db``) into path
    and query, SQLAlchemy style.

    :raises ConfigurationError: for any other shape.
    """
    if not url.startswith("sqlite:///"):
        raise ConfigurationError(
            f"malformed SQLite {kind} URL {url!r}: expected {URL_FORMS} "
            "(three slashes, then the path; four for an absolute path)"
        )
    path, _, query = url[len("sqlite:///") :].partition("?")
    if not path or path == ":memory:" or "#" in path:
        raise ConfigurationError(
            f"malformed SQLite {kind} URL {url!r}: expected {URL_FORMS}; "
            f"for a process-local {kind} use memory://"
        )
    return path, query


class ConnectionPool:
    """SQLite connections handed to worker threads one at a time.

    Connections are opened with ``check_same_thread=False`` and each is used by at
    most one thread at a time (borrowed under a lock, returned after the call). That is
    safe because the sqlite3 module is built thread-safe (``sqlite3.threadsafety``), and
    unlike ``threading.local`` it lets :meth:`close` close every connection from one
    thread instead of leaking the ones owned by idle worker threads. The owner's capacity
    limiter bounds the pool to one connection per concurrent worker thread.

    Each connection is put in WAL mode with ``synchronous=NORMAL``; the first one also
    runs *schema* (``CREATE ... IF NOT EXISTS`` statements), inside one ``BEGIN
    IMMEDIATE`` transaction when *schema_in_transaction* is set.
    """

    def __init__(
        self,
        path: str,
        url: str,
        busy_timeout: float,
        *,
        kind: str,
        schema: Sequence[str],
        schema_in_transaction: bool,
        closed_error: type[AcallError],
    ) -> None:
        self._path = path
        self._url = url
        self._busy_timeout = busy_timeout
        self._kind = kind
        self._schema = tuple(schema)
        self._schema_in_transaction = schema_in_transaction
        self._closed_error = closed_error
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._schema_ready = False

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise self._closed_error(f"{self._kind} {self._url} is closed")
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
                f"cannot open SQLite {self._kind} {self._url}: directory {parent!r} does not "
                "exist; create it first (acall does not create directories)"
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
                if self._schema_in_transaction:
                    conn.execute("BEGIN IMMEDIATE")
                for statement in self._schema:
                    conn.execute(statement)
                if self._schema_in_transaction:
                    conn.execute("COMMIT")
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn


class SqliteRunner:
    """Runs operations on a SQLite file in worker threads, with pooled connections.

    An operation is a function of a connection; :meth:`run` calls it in a worker thread
    and, while the database is locked by another connection, calls it again with
    jittered exponential backoff until *lock_timeout* has passed. An operation must
    therefore be repeatable: it runs its own transaction, which is rolled back if it
    fails.

    :param kind: ``"store"`` or ``"broker"``, for the messages.
    :param error: raised when the pool is used after :meth:`close`.
    :param unavailable: raised for a SQLite failure, or a lock held too long.
    """

    def __init__(
        self,
        path: str,
        url: str,
        *,
        kind: str,
        schema: Sequence[str],
        schema_in_transaction: bool,
        lock_timeout: float,
        max_threads: int,
        error: type[AcallError],
        unavailable: type[AcallError],
    ) -> None:
        self.url = url
        self.kind = kind
        self.lock_timeout = lock_timeout
        self._unavailable = unavailable
        # Short waits inside SQLite keep each worker-thread call brief (a cancelled
        # caller waits for its thread); the retry loop in run() covers the rest.
        self._pool = ConnectionPool(
            path,
            url,
            min(_BACKOFF_MAX, lock_timeout),
            kind=kind,
            schema=schema,
            schema_in_transaction=schema_in_transaction,
            closed_error=error,
        )
        self._limiter = anyio.CapacityLimiter(max_threads)

    def call(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *op* with a pooled connection, in the calling (worker) thread."""
        conn = self._pool.acquire()
        discard = False
        try:
            return op(conn)
        except sqlite3.Error as exc:
            discard = not is_busy(exc)
            raise
        finally:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    discard = True
            self._pool.release(conn, discard=discard)

    async def run(self, op: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run *op* in a worker thread, retrying while the database is locked.

        :raises AcallError: the *unavailable* class given at construction, when SQLite
            fails or the lock is held for longer than *lock_timeout*.
        """
        deadline = time.monotonic() + self.lock_timeout
        delay = _BACKOFF_FIRST
        while True:
            try:
                return await anyio.to_thread.run_sync(self.call, op, limiter=self._limiter)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise self._unavailable(
                        f"SQLite {self.kind} {self.url} failed to {what}: {exc}; check that the "
                        f"file is an acall {self.kind}, readable and writable, and that the "
                        "disk is not full"
                    ) from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._unavailable(
                        f"SQLite {self.kind} {self.url} stayed locked for "
                        f"{self.lock_timeout:g} s while trying to {what}; another process "
                        "holds a long transaction on the file (raise lock_timeout if that is "
                        "expected)"
                    ) from exc
            # Jittered exponential backoff, so processes waiting on the same lock spread out.
            await anyio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def close(self) -> None:
        """Close every connection; later operations raise the *error* class."""
        # Closing the last connection checkpoints the WAL: file I/O, so off the loop.
        await anyio.to_thread.run_sync(self._pool.close, limiter=self._limiter)
