"""Data stores: one conformance suite over every backend, then backend-specific cases.

Everything is real: SQLite files in ``tmp_path``, ``redis-server`` processes, and
Python subprocesses that share a store file with the test.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from loop_watch import longest_gap

from acall._redis import redact_url
from acall.errors import ConfigurationError, InvalidKeyError, StoreUnavailableError
from acall.stores import MemoryStore, RedisStore, SqliteStore, Store, open_store
from acall.testing import RedisServer, StoreConformance, free_port

# -- the conformance suite over every backend -----------------------------------------------


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store, once per backend."""
    if request.param == "memory":
        name = f"conformance-{uuid.uuid4().hex}"
        yield f"memory://{name}"
        MemoryStore.drop(name)
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield request.getfixturevalue("redis_url")


class TestStoreConformance(StoreConformance):
    """Every backend passes :class:`acall.testing.StoreConformance`."""


# -- helpers --------------------------------------------------------------------------------


async def _read_line(process: Process, expected: bytes) -> None:
    """Read the child's stdout until *expected* appears."""
    assert process.stdout is not None
    seen = b""
    with anyio.fail_after(10):
        while expected not in seen:
            seen += await process.stdout.receive()


async def _collect(keys: AsyncIterator[str]) -> list[str]:
    return sorted([key async for key in keys])


# -- memory ---------------------------------------------------------------------------------


async def test_memory_urls_fresh_and_named() -> None:
    async with open_store("memory://") as a, open_store("memory://") as b:
        await a.put("k", b"a")
        assert await b.get("k") is None
    name = f"named-{uuid.uuid4().hex}"
    async with open_store(f"memory://{name}") as a:
        await a.put("k", b"shared")
    # Named data outlives the store objects, like an in-process database.
    async with open_store(f"memory://{name}?ttl=30") as b:
        assert isinstance(b, MemoryStore)
        assert b.url == f"memory://{name}"
        assert b.default_ttl == 30
        assert await b.get("k") == b"shared"
    assert MemoryStore.drop(name) is True
    assert MemoryStore.drop(name) is False
    async with open_store(f"memory://{name}") as c:
        assert await c.get("k") is None
    MemoryStore.drop(name)


async def test_memory_expired_entries_are_dropped_not_just_hidden() -> None:
    async with MemoryStore() as store:
        await store.put_many({f"t{i}": b"x" * 1000 for i in range(100)}, ttl=0.05)
        await anyio.sleep(0.1)
        await store.put("trigger", b"")
        assert list(store._data.entries) == ["trigger"]


# -- sqlite ---------------------------------------------------------------------------------

_CHILD_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from acall.stores import SqliteStore

    async def main(path: str, count: int) -> None:
        async with SqliteStore(path) as store:
            assert await store.get("from-parent") == b"hello child", "parent's write not seen"
            for i in range(count):
                await store.put(f"child-{i}", f"value-{i};".encode() * 2000)
                await asyncio.sleep(0.005)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)

_CHILD_LOCKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("INSERT OR REPLACE INTO acall_blobs (key, value) VALUES ('held', x'01')")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
    conn.close()
    """
)


async def test_sqlite_file_shared_with_a_writing_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    count = 40
    expected = {f"child-{i}": f"value-{i};".encode() * 2000 for i in range(count)}
    async with SqliteStore(path) as store:
        await store.put("from-parent", b"hello child")
        result: list[subprocess.CompletedProcess[bytes]] = []

        async def run_child() -> None:
            cmd = [sys.executable, "-c", _CHILD_WRITER, str(path), str(count)]
            result.append(await anyio.run_process(cmd, check=False))

        reads = 0
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_child)
                while True:
                    values = await store.get_many(list(expected))
                    reads += 1
                    for key, value in zip(expected, values, strict=True):
                        # Readers see a whole value or nothing, across processes too.
                        assert value is None or value == expected[key]
                    if all(value is not None for value in values):
                        break
                    await anyio.sleep(0.01)
        assert result[0].returncode == 0, result[0].stderr.decode()
        assert reads > 1, "the reads should have overlapped the child's writes"
        assert await _collect(store.scan("child-")) == sorted(expected)


async def test_sqlite_put_never_blocks_the_event_loop(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    async with SqliteStore(tmp_path / "big.db") as store:
        await store.put("warm-up", b"x")  # connection and schema set-up

        async def work() -> None:
            await store.put("big", data)
            assert await store.get("big") == data

        gaps = await longest_gap(work)
        assert len(gaps) > 5, "the put finished too quickly to observe the loop"
        assert max(gaps) < 0.05, f"event loop blocked for {max(gaps) * 1000:.0f} ms"


async def test_sqlite_waits_for_a_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    async with (
        SqliteStore(path) as patient,
        SqliteStore(path, lock_timeout=0.3) as impatient,
    ):
        await patient.put("before", b"readable")
        cmd = [sys.executable, "-c", _CHILD_LOCKER, str(path), "1.5"]
        async with await anyio.open_process(cmd) as child:
            await _read_line(child, b"locked")
            locked_at = time.monotonic()
            # WAL: readers are not blocked by the writer's lock.
            assert await patient.get("before") == b"readable"
            with pytest.raises(StoreUnavailableError, match="locked"):
                await impatient.put("fails", b"x")
            assert time.monotonic() - locked_at < 1.4
            await patient.put("waited", b"ok")
            waited = time.monotonic() - locked_at
            assert await child.wait() == 0
        assert waited > 1.0, f"put returned after {waited:.2f} s, before the lock was freed"
        assert await patient.get_many(["waited", "held", "fails"]) == [b"ok", b"\x01", None]


async def test_sqlite_schema_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "schema.db"
    async with SqliteStore(path) as store:
        await store.put("k", b"v", ttl=60)
    conn = sqlite3.connect(path)
    try:
        columns = [
            (row[1], row[2], row[3], row[5])
            for row in conn.execute("PRAGMA table_info(acall_blobs)")
        ]
        assert columns == [
            ("key", "TEXT", 0, 1),
            ("value", "BLOB", 1, 0),
            ("expires_at", "REAL", 0, 0),
            ("used_at", "REAL", 0, 0),
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT * FROM acall_blobs").fetchall()
        ((key, value, expires_at, used_at),) = rows
        assert (key, value) == ("k", b"v")
        assert time.time() + 50 < expires_at < time.time() + 70
        assert time.time() - 10 < used_at <= time.time()
    finally:
        conn.close()


async def test_sqlite_file_without_used_at_is_upgraded(tmp_path: Path) -> None:
    """A blob table written before idle times existed gains the column on first use;
    its old rows count as idle since forever."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "CREATE TABLE acall_blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL)"
        )
        conn.execute("INSERT INTO acall_blobs VALUES ('old', x'01', NULL)")
    conn.close()
    async with SqliteStore(path) as store, SqliteStore(path) as other:
        # Two stores racing to upgrade the same file: both go on.
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.put, "new", b"2")
            tg.start_soon(other.get, "old")
        assert await store.get_many(["old", "new"]) == [b"\x01", b"2"]
        assert await store.delete_idle(["old", "new"], idle=60) == ["old"]


async def test_sqlite_expired_rows_are_purged(tmp_path: Path) -> None:
    path = tmp_path / "purge.db"
    async with SqliteStore(path) as store:
        await store.put_many({f"old-{i}": b"x" * 100 for i in range(20)}, ttl=0.05)
    await anyio.sleep(0.1)
    async with SqliteStore(path) as store:
        await store.put("new", b"y")  # a store's first write purges expired rows
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT key FROM acall_blobs").fetchall() == [("new",)]
    finally:
        conn.close()


async def test_sqlite_relative_and_absolute_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///relative.db") as store:
        assert isinstance(store, SqliteStore)
        assert store.url == "sqlite:///relative.db"
        await store.put("k", b"v")
    assert (tmp_path / "relative.db").is_file()
    absolute = tmp_path / "sub" / "absolute.db"
    absolute.parent.mkdir()
    url = f"sqlite:///{absolute}"
    assert url.startswith("sqlite:////")
    async with open_store(url + "?lock_timeout=2.5&max_threads=2") as store:
        assert isinstance(store, SqliteStore)
        assert store.path == str(absolute)
        assert store.lock_timeout == 2.5
        await store.put("k", b"v")
    assert absolute.is_file()


async def test_sqlite_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/no/such/dir/store.db") as store:
        with pytest.raises(ConfigurationError, match="does not exist"):
            await store.put("k", b"v")


async def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    async with SqliteStore(path) as store:
        with pytest.raises(StoreUnavailableError, match=r"junk\.db") as caught:
            await store.get("k")
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


# -- redis ----------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_client_kill_between_operations_is_invisible(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with open_store(redis_url) as store:
        await store.put("k", b"v")
        killed = redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert isinstance(killed, int)
        assert killed >= 1
        assert await store.get("k") == b"v"
        redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        await store.put_many({"a": b"1", "b": b"2"})
        redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert await store.get_many(["a", "b", "k"]) == [b"1", b"2", b"v"]
        redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert await store.exists_many(["a", "zz"]) == [True, False]
        redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert await _collect(store.scan()) == ["a", "b", "k"]


@pytest.mark.redis
async def test_redis_server_down_then_back(redis_server: RedisServer) -> None:
    # A private server: stopping the session one would disturb other tests.
    with RedisServer(executable=redis_server.executable) as server:
        async with open_store(server.url_for(0)) as store:
            await store.put("k", b"v")
            await server.astop()
            started = time.monotonic()
            with anyio.fail_after(15), pytest.raises(StoreUnavailableError) as caught:
                await store.get("k")
            assert time.monotonic() - started < 10
            message = str(caught.value)
            assert f"127.0.0.1:{server.port}" in message
            assert "redis-server is running" in message
            # Back on the same port (empty, no persistence): the same store reconnects.
            await server.astart()
            assert await store.get("k") is None
            await store.put("k", b"again")
            assert await store.get("k") == b"again"


@pytest.mark.redis
async def test_redis_unreachable_port_fails_fast_but_validates_first() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with open_store(url, retries=2) as store:
        with pytest.raises(InvalidKeyError):
            await store.get("../etc/passwd")
        with anyio.fail_after(10), pytest.raises(StoreUnavailableError, match="unreachable"):
            await store.get("fine")


@pytest.mark.redis
async def test_redis_prefix_isolation(redis_url: str) -> None:
    async with (
        open_store(redis_url + "?prefix=app1:") as one,
        open_store(redis_url, prefix="app2:") as two,
        open_store(redis_url) as default,
    ):
        assert isinstance(one, RedisStore)
        assert one.prefix == "app1:"
        assert isinstance(default, RedisStore)
        assert default.prefix == "acall:data:"
        await one.put("k", b"one")
        await two.put("k", b"two")
        await one.put("only-one", b"x")
        assert await one.get("k") == b"one"
        assert await two.get("k") == b"two"
        assert await default.get("k") is None
        assert await two.exists("only-one") is False
        assert await _collect(one.scan()) == ["k", "only-one"]
        assert await _collect(two.scan()) == ["k"]
        assert await two.delete("k", "only-one") == 1
        assert await one.get_many(["k", "only-one"]) == [b"one", b"x"]


@pytest.mark.redis
async def test_redis_keys_are_prefixed_and_scan_escapes_glob(
    redis_url: str, redis_server: RedisServer
) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    async with (
        open_store(redis_url, prefix="p*[x]?:") as globby,
        open_store(redis_url, prefix="pa[x]b:") as plain,
    ):
        await globby.put("k1", b"1")
        await plain.put("k2", b"2", ttl=30)
        raw = redis_server.command("KEYS", "*", db=db)
        assert isinstance(raw, list)
        assert sorted(raw) == [b"p*[x]?:k1", b"pa[x]b:k2"]  # type: ignore[type-var]
        assert await _collect(globby.scan()) == ["k1"]
        assert await _collect(plain.scan("k")) == ["k2"]
        pttl = redis_server.command("PTTL", "pa[x]b:k2", db=db)
        assert isinstance(pttl, int)
        assert 25_000 < pttl <= 30_000


@pytest.mark.redis
async def test_redis_password_is_used_and_redacted(redis_server: RedisServer) -> None:
    secret = "hunter2-secret"
    with RedisServer(
        executable=redis_server.executable, extra_args=["--requirepass", secret]
    ) as server:
        good = f"redis://:{secret}@127.0.0.1:{server.port}/0"
        async with open_store(good) as store:
            assert secret not in store.url
            assert store.url == f"redis://:***@127.0.0.1:{server.port}/0"
            assert secret not in repr(store)
            await store.put("k", b"v")
            assert await store.get("k") == b"v"
        wrong = f"redis://:wrong-{secret}@127.0.0.1:{server.port}/0"
        async with open_store(wrong, retries=0) as store:
            with pytest.raises(StoreUnavailableError, match="password") as caught:
                await store.get("k")
            assert secret not in str(caught.value)
    with pytest.raises(ConfigurationError) as bad:
        open_store(f"redis://user:{secret}@127.0.0.1:notaport/0")
    assert secret not in str(bad.value)


# -- open_store URL parsing -----------------------------------------------------------------


async def test_open_store_parses_redis_urls() -> None:
    async with open_store("redis://:pw@example.invalid:6380/5?prefix=x:&ttl=2.5") as store:
        assert isinstance(store, RedisStore)
        assert (store.host, store.port, store.db, store.prefix) == (
            "example.invalid",
            6380,
            5,
            "x:",
        )
        assert store.default_ttl == 2.5
        assert store.url == "redis://:***@example.invalid:6380/5?prefix=x:&ttl=2.5"
        assert store.max_value_size == 256 * 1024 * 1024
    async with open_store("rediss://example.invalid", ttl=9, prefix="") as store:
        assert isinstance(store, RedisStore)
        assert (store.port, store.db, store.prefix, store.default_ttl) == (6379, 0, "", 9)
        assert store.url.startswith("rediss://")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host", "redis://:***@host"),
        ("redis://user@host/0", "redis://user@host/0"),
        # Unescaped characters a password should not hold, but may.
        ("redis://user:s3c@ret@host/0", "redis://user:***@host/0"),
        ("redis://user:s3c/ret@host/0", "redis://user:***@host/0"),
        ("redis://user:s3c?ret@host", "redis://user:***@host"),
        ("redis://user:s3c#ret@host", "redis://user:***@host"),
        ("redis://u:s3cret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("user:s3cret@host", "user:***@host"),
        # An '@' after the authority is not a password's end.
        ("redis://host:6379/0?prefix=a@b:", "redis://host:6379/0?prefix=a@b:"),
        ("redis://u:s3cret@host/0?prefix=a@b", "redis://u:***@host/0?prefix=a@b"),
        ("redis://[::1]/0?prefix=a@b", "redis://[::1]/0?prefix=a@b"),
        ("sqlite:////tmp/a@b/x.db", "sqlite:////tmp/a@b/x.db"),
        ("memory://name", "memory://name"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3c" not in redact_url(url)


async def test_max_value_size_defaults(tmp_path: Path) -> None:
    async with open_store("memory://") as memory, open_store(f"sqlite:///{tmp_path}/m.db") as lite:
        assert memory.max_value_size == 1024 * 1024 * 1024
        assert lite.max_value_size == 256 * 1024 * 1024


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "accepted forms"),
        ("nonsense", "accepted forms"),
        ("ftp://host/x", "unknown store URL scheme 'ftp'.*accepted forms"),
        ("http://host", "accepted forms"),
        ("memory://a/b", "memory://name"),
        ("memory://bad name", "invalid memory store name"),
        ("memory://x?bogus=1", "unknown option 'bogus'"),
        ("sqlite://relative.db", "three slashes"),
        ("sqlite:///", "sqlite:///relative"),
        ("sqlite:///:memory:", "memory://"),
        ("sqlite:///x.db?lock_timeout=soon", "invalid value 'soon'"),
        ("sqlite:///x.db?ttl=0", "ttl"),
        ("redis://", "names no host"),
        ("redis://host:notaport/0", "malformed Redis URL"),
        ("redis://host:99999/0", "malformed Redis URL"),
        ("redis://host/abc", "database number"),
        ("redis://host/0?ttl=-1", "ttl"),
        ("redis://host/0?ttl=abc", "invalid value 'abc'"),
        ("redis://host/0?bogus=1", "unknown option 'bogus'.*prefix"),
        ("redis://host/0?prefix=a%20b", "invalid Redis key prefix"),
        ("redis://host/0?retries=-1", "retries"),
        ("redis://host/0?ttl=1&ttl=2", "twice"),
        ("redis://host/0#frag", "fragment"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        open_store(url)


def test_open_store_rejects_unknown_keyword_options() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'bogus'.*ttl"):
        open_store("memory://", bogus=1)
    with pytest.raises(ConfigurationError, match="max_threads"):
        open_store("sqlite:///x.db", max_threads=0)


async def test_open_store_without_redis_package(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        from acall.errors import ConfigurationError
        from acall.stores import open_store
        assert open_store("memory://") is not None
        try:
            open_store("redis://127.0.0.1:6379/0")
        except ConfigurationError as exc:
            print(exc)
        else:
            raise SystemExit("no ConfigurationError")
        try:
            from acall.stores import RedisStore
        except ImportError as exc:
            assert "pip install" in str(exc)
        else:
            raise SystemExit("no ImportError")
        """
    )
    result = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert "pip install 'acall[redis]'" in result.stdout.decode()


async def test_store_is_abstract() -> None:
    with pytest.raises(TypeError):
        Store("x://", max_value_size=1, default_ttl=None)  # type: ignore[abstract]


async def test_deeply_nested_non_str_key_is_an_invalid_key_error() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    async with MemoryStore() as store:
        with pytest.raises(InvalidKeyError, match="keys must be str, got list"):
            await store.get(deep)  # type: ignore[arg-type]
