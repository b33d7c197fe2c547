"""Helpers for testing acall and code built on it, with real backends only.

* :class:`RedisServer` starts a throw-away ``redis-server`` on a free loopback port;
* :class:`StoreConformance` is the test suite every :class:`~acall.stores.Store` must
  pass; subclass it in a test module and provide a ``store_url`` fixture.

Nothing here imports pytest, so the helpers work under any test runner.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.to_thread

from acall.errors import ConfigurationError, InvalidKeyError, StoreError
from acall.stores import Store, open_store

__all__ = ["RedisServer", "RedisServerError", "StoreConformance", "free_port"]

_HOST: Final = "127.0.0.1"
#: A decoded RESP2 reply, as :meth:`RedisServer.command` returns it.
RespValue = str | int | bytes | None | list["RespValue"]


def free_port(host: str = _HOST) -> int:
    """Return a TCP port on *host* that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServerError(RuntimeError):
    """``redis-server`` could not be started, or a raw command got an error reply."""


class RedisServer:
    """A real ``redis-server`` process on a free loopback port, in a temporary directory.

    By default the server keeps nothing on disk (``--save "" --appendonly no``), so
    :meth:`restart` comes back empty on the same port. With ``persistent=True`` it logs
    every write to an append-only file synced before each reply (``--appendonly yes
    --appendfsync always``) in a directory kept until :meth:`close`, so whatever it
    acknowledged survives :meth:`stop`, :meth:`kill` and :meth:`restart`, as on a
    production server. Use it as a context manager, or call :meth:`start` and
    :meth:`close`::

        with RedisServer() as server:
            store = open_store(server.url_for(db=1))

    :param executable: path of ``redis-server`` (default: found on ``PATH``).
    :param port: a fixed port (default: a free one, chosen at the first start).
    :param databases: number of logical databases, for one-DB-per-test isolation.
    :param startup_timeout: seconds to wait for ``PING`` to answer after a start.
    :param extra_args: more ``redis-server`` arguments, e.g. ``["--requirepass", "pw"]``.
    :param persistent: keep the data across restarts (append-only file, fsync always).
    """

    host: Final = _HOST

    def __init__(
        self,
        *,
        executable: str | None = None,
        port: int | None = None,
        databases: int = 64,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        persistent: bool = False,
    ) -> None:
        found = executable or self.find_executable()
        if found is None:
            raise RedisServerError(
                "redis-server was not found on PATH; install Redis (for example "
                "'apt-get install redis-server' or 'brew install redis')"
            )
        self.executable = found
        self.databases = databases
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.persistent = persistent
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @staticmethod
    def find_executable() -> str | None:
        """Return the path of ``redis-server`` on ``PATH``, or ``None``."""
        return shutil.which("redis-server")

    @property
    def port(self) -> int:
        """The server's port (fixed by the first :meth:`start`)."""
        if self._port is None:
            raise RedisServerError("the server has no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int = 0) -> str:
        """Return the URL of logical database *db*."""
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def directory(self) -> str | None:
        """The server's working directory (holds ``redis.log``)."""
        return self._dir

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``; no-op if running.

        :raises RedisServerError: if it does not answer within ``startup_timeout``
            (the message includes the end of its log).
        """
        if self.running:
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="acall-redis-")
        # A port picked by free_port() can be taken before redis binds it; try again
        # with another one unless the caller fixed the port.
        attempts = 1 if self._port is not None else 3
        for attempt in range(attempts):
            port = self._port if self._port is not None else free_port()
            if self._launch(port):
                self._port = port
                return
            if attempt == attempts - 1:
                raise RedisServerError(
                    f"redis-server did not start on {self.host}:{port} within "
                    f"{self.startup_timeout:g} s; log tail:\n{self._log_tail()}"
                )

    def _launch(self, port: int) -> bool:
        assert self._dir is not None
        args = [
            self.executable,
            "--port",
            str(port),
            "--bind",
            self.host,
            "--save",
            "",
            *(
                ("--appendonly", "yes", "--appendfsync", "always")
                if self.persistent
                else ("--appendonly", "no")
            ),
            "--dir",
            self._dir,
            "--databases",
            str(self.databases),
            *self.extra_args,
        ]
        with open(os.path.join(self._dir, "redis.log"), "ab") as log:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._process = process
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if self._ping(port):
                return True
            time.sleep(0.02)
        self._terminate(process, signal.SIGKILL)
        self._process = None
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server with SIGTERM (SIGKILL after *timeout* s) and wait for it."""
        process, self._process = self._process, None
        if process is not None:
            self._terminate(process, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash, for fault tests) and wait for it.

        A ``persistent`` server loses nothing it acknowledged: each write is synced to
        its append-only file before the reply.
        """
        process, self._process = self._process, None
        if process is not None:
            self._terminate(process, signal.SIGKILL)

    def restart(self) -> None:
        """Stop the server and start it again on the same port.

        It comes back empty, unless it is ``persistent``: then with every write it
        acknowledged.
        """
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def astart(self) -> None:
        """:meth:`start` in a worker thread, for async tests."""
        await anyio.to_thread.run_sync(self.start)

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread, for async tests."""
        await anyio.to_thread.run_sync(self.stop)

    async def arestart(self) -> None:
        """:meth:`restart` in a worker thread, for async tests."""
        await anyio.to_thread.run_sync(self.restart)

    def command(self, *args: str | bytes | int, db: int | None = None) -> RespValue:
        """Send one command on a fresh raw connection and return the decoded reply.

        Handy for fault injection (``CLIENT KILL TYPE normal``) and inspection, from a
        connection that is not any store's. Simple strings come back as ``str``.

        :raises RedisServerError: on an error reply.
        """
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            reader = sock.makefile("rb")
            try:
                if db is not None:
                    sock.sendall(_encode_command(("SELECT", db)))
                    _read_reply(reader)
                sock.sendall(_encode_command(args))
                return _read_reply(reader)
            finally:
                reader.close()

    def flushdb(self, db: int) -> None:
        """Empty logical database *db*."""
        self.command("FLUSHDB", db=db)

    def __enter__(self) -> Self:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server and remove its directory."""
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self._port} {state}>"

    def _ping(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
                # NOAUTH: alive, but started with --requirepass.
                return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    @staticmethod
    def _terminate(
        process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float = 10.0
    ) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir, "redis.log"), "rb") as log:
                return log.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: io.BufferedIOBase) -> RespValue:
    line = reader.readline()
    if not line:
        raise RedisServerError("connection closed before a reply arrived")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisServerError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [_read_reply(reader) for _ in range(count)]
    raise RedisServerError(f"unexpected reply line {line!r:.80}")


# -- store conformance ---------------------------------------------------------------------

#: Keys every store must reject, each aimed at a different backend weakness.
INVALID_KEYS: Final[tuple[object, ...]] = (
    "../etc/passwd",
    "a b",
    "x'; DROP TABLE acall_blobs; --",
    "",
    "k" * 257,
    "k" * 300,
    "line\nbreak",
    "glob*",
    "q?",
    "[x]",
    "a/b",
    "caf\u00e9",
    "nul\x00",
    b"bytes-key",
    None,
    42,
)


class _Caught:
    """The exception a :func:`_raises` block raised."""

    value: BaseException | None = None


@contextlib.contextmanager
def _raises(kind: type[BaseException] | tuple[type[BaseException], ...]) -> Iterator[_Caught]:
    # pytest.raises without importing pytest, so acall.testing runs under any runner.
    caught = _Caught()
    try:
        yield caught
    except kind as exc:
        caught.value = exc
        return
    raise AssertionError(f"expected {kind} to be raised")


async def _collect(keys: AsyncIterator[str]) -> list[str]:
    return sorted([key async for key in keys])


class StoreConformance:
    """Test methods every :class:`~acall.stores.Store` backend must pass.

    Subclass it in a test module (the subclass name must start with ``Test``) and
    provide a ``store_url`` fixture: a URL whose stores all share the same data and
    which holds no keys when the test starts. Each test opens its own stores with
    :func:`acall.stores.open_store` and closes them.
    """

    async def test_touch_many_reports_existence(self, store_url: str) -> None:
        """touch_many answers, per key in order, whether it holds a value."""
        async with open_store(store_url) as store:
            await store.put_many({"t1": b"one", "t2": b"two"})
            assert await store.touch_many(["t2", "missing", "t1", "t2"]) == [
                True,
                False,
                True,
                True,
            ]
            assert await store.touch_many([]) == []
            assert await store.get("t1") == b"one"  # touching changes no value

    async def test_delete_idle_spares_recently_written_or_touched_keys(
        self, store_url: str
    ) -> None:
        """delete_idle removes only keys unused for the idle time, and says which."""
        async with open_store(store_url) as store:
            await store.put_many({"idle-old": b"one", "idle-touched": b"two"})
            await anyio.sleep(2.5)  # Redis' LRU clock counts whole seconds
            await store.put("idle-fresh", b"three")
            assert await store.touch_many(["idle-touched"]) == [True]
            keys = ["idle-old", "idle-fresh", "idle-touched", "idle-missing", "idle-old"]
            assert await store.delete_idle(keys, idle=1.0) == ["idle-old"]
            assert await store.get_many(["idle-old", "idle-fresh", "idle-touched"]) == [
                None,
                b"three",
                b"two",
            ]
            assert await store.delete_idle(["idle-fresh"], idle=3600) == []
            with _raises(ConfigurationError) as caught:
                await store.delete_idle(["idle-fresh"], idle=0)
            assert "idle" in str(caught.value)

    async def test_put_get_round_trip(self, store_url: str) -> None:
        """A value put is the value got back, byte for byte."""
        async with open_store(store_url) as store:
            await store.put("alpha", b"\x00\x01binary\xff")
            assert await store.get("alpha") == b"\x00\x01binary\xff"

    async def test_missing_key_is_none(self, store_url: str) -> None:
        """A key never written reads as None and does not exist."""
        async with open_store(store_url) as store:
            assert await store.get("never-written") is None
            assert await store.exists("never-written") is False

    async def test_get_many_keeps_order_with_missing_and_duplicates(self, store_url: str) -> None:
        """get_many answers in request order, None for missing keys."""
        async with open_store(store_url) as store:
            await store.put_many({"k1": b"one", "k2": b"two", "k3": b"three"})
            result = await store.get_many(["k3", "missing", "k1", "k3", "k2"])
            assert result == [b"three", None, b"one", b"three", b"two"]
            assert await store.get_many([]) == []

    async def test_get_many_more_keys_than_one_query_chunk(self, store_url: str) -> None:
        """Batches larger than one backend query come back whole and in order."""
        async with open_store(store_url) as store:
            items = {f"bulk-{i:04d}": str(i).encode() for i in range(1200)}
            await store.put_many(items)
            keys = [*reversed(items), "absent"]
            values = await store.get_many(keys)
            assert values == [*(items[key] for key in reversed(items)), None]
            assert await store.exists_many(keys) == [True] * 1200 + [False]
            assert await store.delete(*items) == 1200

    async def test_exists_and_exists_many(self, store_url: str) -> None:
        """exists/exists_many see values, including empty ones."""
        async with open_store(store_url) as store:
            await store.put("here", b"x")
            await store.put("empty", b"")
            assert await store.exists("here") is True
            assert await store.exists("empty") is True
            assert await store.exists_many(["here", "gone", "empty", "here"]) == [
                True,
                False,
                True,
                True,
            ]
            assert await store.exists_many([]) == []

    async def test_delete_returns_count(self, store_url: str) -> None:
        """delete counts the keys that held a value, each once."""
        async with open_store(store_url) as store:
            await store.put_many({"d1": b"1", "d2": b"2", "d3": b"3"})
            assert await store.delete("d1", "d2", "d2", "nope") == 2
            assert await store.get_many(["d1", "d2", "d3"]) == [None, None, b"3"]
            assert await store.delete("d1") == 0
            assert await store.delete() == 0

    async def test_overwrite_replaces_value(self, store_url: str) -> None:
        """A second put replaces the first value entirely."""
        async with open_store(store_url) as store:
            await store.put("over", b"first value, longer")
            await store.put("over", b"second")
            assert await store.get("over") == b"second"
            await store.put_many({"over": b"third"})
            assert await store.get("over") == b"third"

    async def test_empty_value_is_not_missing(self, store_url: str) -> None:
        """An empty value is a value, distinct from a missing key."""
        async with open_store(store_url) as store:
            await store.put("empty", b"")
            assert await store.get("empty") == b""
            assert await store.get_many(["empty"]) == [b""]

    async def test_large_value(self, store_url: str) -> None:
        """A 5 MB value round-trips."""
        data = os.urandom(5 * 1024 * 1024)
        async with open_store(store_url) as store:
            await store.put("large", data)
            assert await store.get("large") == data
            assert await store.get_many(["large"]) == [data]

    async def test_bytes_like_values_are_snapshots(self, store_url: str) -> None:
        """bytearray/memoryview are accepted and copied at put time."""
        async with open_store(store_url) as store:
            buffer = bytearray(b"mutable")
            await store.put("ba", buffer)
            buffer[:] = b"changed"
            await store.put_many({"mv": memoryview(b"view")})
            assert await store.get_many(["ba", "mv"]) == [b"mutable", b"view"]

    async def test_put_many_round_trip(self, store_url: str) -> None:
        """put_many stores every item."""
        async with open_store(store_url) as store:
            items = {f"many-{i}": os.urandom(i * 10) for i in range(50)}
            await store.put_many(items)
            assert await store.get_many(list(items)) == list(items.values())
            await store.put_many({})

    async def test_ttl_expiry(self, store_url: str) -> None:
        """Values put with a TTL disappear after it, from every read path."""
        async with open_store(store_url) as store:
            await store.put("short", b"x", ttl=0.2)
            await store.put_many({"short-many": b"y"}, ttl=0.2)
            await store.put("long", b"z", ttl=60)
            await store.put("forever", b"w")
            assert await store.get_many(["short", "short-many"]) == [b"x", b"y"]
            await anyio.sleep(0.4)
            assert await store.get("short") is None
            assert await store.get_many(["short-many", "long", "forever"]) == [
                None,
                b"z",
                b"w",
            ]
            assert await store.exists_many(["short", "short-many", "long"]) == [
                False,
                False,
                True,
            ]
            assert await _collect(store.scan("short")) == []
            assert await store.delete("short", "long") == 1

    async def test_default_ttl_option(self, store_url: str) -> None:
        """The store-level ttl option applies when a put passes none."""
        async with open_store(store_url, ttl=0.2) as store:
            assert store.default_ttl == 0.2
            await store.put("default-ttl", b"x")
            await store.put("explicit-ttl", b"y", ttl=60)
            await anyio.sleep(0.4)
            assert await store.get_many(["default-ttl", "explicit-ttl"]) == [None, b"y"]

    async def test_invalid_ttl_rejected(self, store_url: str) -> None:
        """Non-positive, non-finite and non-numeric TTLs are rejected."""
        async with open_store(store_url) as store:
            for ttl in (0, -1, math.nan, math.inf, True, "5"):
                with _raises(ConfigurationError):
                    await store.put("ttl-key", b"x", ttl=ttl)  # type: ignore[arg-type]
            assert await store.exists("ttl-key") is False

    async def test_scan_by_prefix(self, store_url: str) -> None:
        """scan yields exactly the keys with the prefix, and tolerates deletes."""
        async with open_store(store_url) as store:
            await store.put_many(
                {"job:1": b"a", "job:2": b"b", "job-x": b"c", "jobs": b"d", "other": b"e"}
            )
            assert await _collect(store.scan("job:")) == ["job:1", "job:2"]
            assert await _collect(store.scan("job")) == ["job-x", "job:1", "job:2", "jobs"]
            assert await _collect(store.scan()) == ["job-x", "job:1", "job:2", "jobs", "other"]
            assert await _collect(store.scan("nothing")) == []
            # Deleting while scanning is the cleanup use case.
            async for key in store.scan("job"):
                await store.delete(key)
            assert await _collect(store.scan()) == ["other"]

    async def test_scan_pages_through_many_keys(self, store_url: str) -> None:
        """scan returns every key of a large set, each once."""
        async with open_store(store_url) as store:
            items = {f"page-{i:05d}": b"" for i in range(2500)}
            await store.put_many(items)
            assert await _collect(store.scan("page-")) == sorted(items)

    async def test_valid_key_alphabet_and_length(self, store_url: str) -> None:
        """Every allowed character and the maximum length are accepted."""
        reference = "__pynenc__client_data__:" + "0123456789abcdef" * 4
        edge = ["A-Z.a_z:0-9", "k" * 256, reference, "-", "."]
        async with open_store(store_url) as store:
            await store.put_many({key: key.encode() for key in edge})
            assert await store.get_many(edge) == [key.encode() for key in edge]

    async def test_invalid_keys_rejected_before_backend(self, store_url: str) -> None:
        """Malformed keys raise InvalidKeyError before any backend call."""
        store = open_store(store_url)
        try:
            await store.put("good", b"kept")
            await self._check_invalid_keys(store)
            assert await _collect(store.scan()) == ["good"]
        finally:
            await store.close()
        # Validation comes first: a closed store still reports the bad key, not that it
        # is closed, so a malformed key can never reach a backend.
        await self._check_invalid_keys(store)

    @staticmethod
    async def _check_invalid_keys(store: Store) -> None:
        for bad in INVALID_KEYS:
            key: str = bad  # type: ignore[assignment]
            with _raises(InvalidKeyError):
                await store.put(key, b"x")
            with _raises(InvalidKeyError):
                await store.put_many({"fine": b"x", key: b"x"})
            with _raises(InvalidKeyError):
                await store.get(key)
            with _raises(InvalidKeyError):
                await store.get_many(["fine", key])
            with _raises(InvalidKeyError):
                await store.exists(key)
            with _raises(InvalidKeyError):
                await store.exists_many([key])
            with _raises(InvalidKeyError):
                await store.delete("fine", key)
        with _raises(InvalidKeyError):
            await store.get_many("fine")  # a bare str is not a list of keys
        for bad_prefix in ("../", "*", "a b", "%", "k" * 257):
            with _raises(InvalidKeyError):
                await _collect(store.scan(bad_prefix))
        with _raises(InvalidKeyError) as caught:
            await store.get("../etc/passwd")
        assert "../etc/passwd" in str(caught.value), "the error must name the key"

    async def test_non_bytes_values_rejected(self, store_url: str) -> None:
        """Values that are not bytes-like raise TypeError; nothing is written."""
        async with open_store(store_url) as store:
            for value in ("text", 1, None, [1, 2], 1.5):
                with _raises(TypeError):
                    await store.put("typed", value)  # type: ignore[arg-type]
                with _raises(TypeError):
                    await store.put_many({"typed-ok": b"x", "typed": value})  # type: ignore[dict-item]
            assert await store.exists_many(["typed", "typed-ok"]) == [False, False]

    async def test_value_above_max_value_size_rejected(self, store_url: str) -> None:
        """Values above max_value_size raise StoreError; nothing is written."""
        async with open_store(store_url, max_value_size=16) as store:
            assert store.max_value_size == 16
            await store.put("fits", b"x" * 16)
            with _raises(StoreError):
                await store.put("too-big", b"x" * 17)
            with _raises(StoreError):
                await store.put_many({"small": b"x", "too-big": b"x" * 17})
            assert await store.exists_many(["fits", "small", "too-big"]) == [True, False, False]

    async def test_close_is_idempotent_and_final(self, store_url: str) -> None:
        """close() can be repeated; a closed store refuses operations."""
        store = open_store(store_url)
        await store.put("before-close", b"x")
        await store.close()
        await store.close()
        assert store.closed
        with _raises(StoreError):
            await store.get("before-close")
        with _raises(StoreError):
            await store.put("after-close", b"x")
        async with open_store(store_url) as other:
            assert await other.get("before-close") == b"x"

    async def test_context_manager_closes(self, store_url: str) -> None:
        """Leaving ``async with`` closes the store."""
        async with open_store(store_url) as store:
            await store.put("ctx", b"x")
        assert store.closed
        with _raises(StoreError):
            await store.exists("ctx")

    async def test_two_instances_share_data(self, store_url: str) -> None:
        """Two stores on the same URL see each other's writes."""
        async with open_store(store_url) as first, open_store(store_url) as second:
            await first.put("shared", b"from first")
            assert await second.get("shared") == b"from first"
            await second.delete("shared")
            assert await first.exists("shared") is False

    async def test_concurrent_operations(self, store_url: str) -> None:
        """Many concurrent puts and gets on one store all succeed."""
        async with open_store(store_url) as store:
            results: dict[str, bytes | None] = {}

            async def worker(i: int) -> None:
                key = f"conc-{i}"
                await store.put(key, key.encode() * 100)
                results[key] = await store.get(key)

            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(worker, i)
            assert results == {f"conc-{i}": f"conc-{i}".encode() * 100 for i in range(40)}

    async def test_cancelled_put_is_all_or_nothing(self, store_url: str) -> None:
        """A put cancelled at any point leaves the whole value or none, and a usable store."""
        data = os.urandom(5 * 1024 * 1024)
        async with open_store(store_url) as store:
            for delay in (0.0, 0.0005, 0.002, 0.01):
                key = f"cancel-{delay}"
                with anyio.move_on_after(delay):
                    await store.put(key, data)
                assert await store.get(key) in (None, data)
            await store.put("after-cancel", b"ok")
            assert await store.get("after-cancel") == b"ok"

    async def test_url_and_repr(self, store_url: str) -> None:
        """url keeps the scheme and appears in repr()."""
        async with open_store(store_url) as store:
            assert store.url.split("://")[0] == store_url.split("://")[0]
            assert store.url in repr(store)
