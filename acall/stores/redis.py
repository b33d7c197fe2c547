"""A data store in Redis, through ``redis.asyncio`` (redis-py >= 5).

Keys are stored as ``prefix + key`` (default prefix ``acall:data:``). A dropped connection
(a server-side ``CLIENT KILL``, an idle timeout, a short restart) is retried with
jittered exponential backoff, so callers never see it; when the server stays
unreachable the operation raises :class:`~acall.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from redis.asyncio import Redis

from acall._redis import (
    CONNECTION_OPTIONS,
    DEFAULT_PORT,
    RedisConnection,
    check_settings,
    redact_url,
    shown_url,
    url_arguments,
)
from acall.errors import StoreError, StoreUnavailableError
from acall.stores.base import KEY_PATTERN, MiB, Store

# redact_url is re-exported: it was first defined here.
__all__ = ["DEFAULT_PREFIX", "RedisStore", "redact_url"]

_T = TypeVar("_T")

#: The key prefix of a store unless the URL says otherwise.
DEFAULT_PREFIX: Final = "acall:data:"

_URL_FORMS: Final = (
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:data:&ttl=SECONDS] "
    "(rediss:// for TLS)"
)
_GLOB_SPECIAL: Final = re.compile(r"([\\*?\[\]])")
_SCAN_COUNT: Final = 1000
_IDLE_BATCH: Final = 500

# KEYS: candidate keys; ARGV[1]: idle seconds. Deletes the keys whose idle time (since
# the last write, read or TOUCH, per the server's LRU clock) is at least ARGV[1] and
# returns their indexes (1-based). Keys whose idle time cannot be trusted are kept,
# never guessed about: OBJECT IDLETIME fails under an LFU eviction policy, and small
# integer values ("12") are shared objects whose idle time never resets.
_DELETE_IDLE: Final = """
local gone = {}
local idle = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local ok, seconds = pcall(redis.call, 'OBJECT', 'IDLETIME', key)
  if ok and seconds and seconds >= idle
      and redis.call('OBJECT', 'ENCODING', key) ~= 'int' then
    redis.call('UNLINK', key)
    gone[#gone + 1] = i
  end
end
return gone
"""


def _as_bytes(value: bytes | str) -> bytes:
    # The client never decodes responses, so str cannot arrive; typing allows it.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class RedisStore(Store):
    """A store in a Redis database, shared by every process that reaches the server.

    :param host: server host name or address.
    :param port: server port.
    :param db: database number.
    :param username: ACL user name, if any.
    :param password: password, if any (never shown in :attr:`url` or messages).
    :param ssl: connect with TLS (``rediss://``).
    :param prefix: prepended to every key in Redis, so several apps can share a DB.
    :param ttl: default expiry in seconds for puts that pass ``ttl=None``.
    :param retries: reconnect attempts for one operation before it fails.
    :param socket_timeout: seconds to wait for one reply (large values need time).
    :param socket_connect_timeout: seconds to wait for a TCP connection.
    :param max_connections: pool size; further concurrent operations wait for a slot.
    :param max_value_size: largest accepted value (default 256 MiB; Redis' hard limit
        is 512 MB).
    :param ssl_ca_certs: CA bundle to verify the server against (``rediss://``).
    :param ssl_cert_reqs: ``"required"`` (default), ``"optional"`` or ``"none"``.
    :param url: what :attr:`url` shows (redacted); built from the parts when omitted.
    :ivar prefix: the key prefix in Redis.
    :ivar host: server host.
    :ivar port: server port.
    :ivar db: database number.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        prefix: str = DEFAULT_PREFIX,
        ttl: float | None = None,
        retries: int = 5,
        socket_timeout: float = 30.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 64,
        max_value_size: int = 256 * MiB,
        ssl_ca_certs: str | None = None,
        ssl_cert_reqs: str = "required",
        url: str | None = None,
    ) -> None:
        check_settings(
            prefix=prefix,
            default_prefix=DEFAULT_PREFIX,
            port=port,
            db=db,
            retries=retries,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            ssl_cert_reqs=ssl_cert_reqs,
        )
        url = shown_url(
            url, ssl=ssl, username=username, password=password, host=host, port=port, db=db
        )
        super().__init__(url, max_value_size=max_value_size, default_ttl=ttl)
        self.prefix = prefix
        self.host = host
        self.port = port
        self.db = db
        self._prefix_bytes = prefix.encode("ascii")
        self._redis = RedisConnection(
            kind="store",
            url=self.url,
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=ssl,
            ssl_ca_certs=ssl_ca_certs,
            ssl_cert_reqs=ssl_cert_reqs,
            retries=retries,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            decode_responses=False,
            error=StoreError,
            unavailable=StoreUnavailableError,
        )
        self._client: Redis = self._redis.client
        self._delete_idle_script = self._client.register_script(_DELETE_IDLE)

    @classmethod
    def from_url(cls, url: str, **options: object) -> RedisStore:
        """Open ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``).

        Query options: ``prefix``, ``ttl``, ``retries``, ``socket_timeout``,
        ``socket_connect_timeout``, ``max_connections``, ``max_value_size``,
        ``ssl_ca_certs``, ``ssl_cert_reqs``; keyword *options* override them.
        """
        converters: dict[str, Callable[[str], object]] = {
            **CONNECTION_OPTIONS,
            "ttl": float,
            "max_value_size": int,
        }
        arguments = url_arguments(url, options, converters, _URL_FORMS)
        return cls(**arguments)  # type: ignore[arg-type]

    # -- plumbing ---------------------------------------------------------------------------

    def _k(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode("ascii")

    @staticmethod
    def _px(ttl: float | None) -> int | None:
        return None if ttl is None else max(1, math.ceil(ttl * 1000))

    async def _call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await *operation*, turning every redis-py failure into an acall error."""
        return await self._redis.call(what, operation)

    # -- backend hooks ------------------------------------------------------------------------

    async def _put(self, key: str, data: bytes, ttl: float | None) -> None:
        await self._call(
            f"put {key!r}", lambda: self._client.set(self._k(key), data, px=self._px(ttl))
        )

    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        px = self._px(ttl)

        async def operation() -> list[Any]:
            # transaction=False: every SET is atomic on its own, and a retried pipeline
            # simply writes the same values again.
            async with self._client.pipeline(transaction=False) as pipe:
                for key, data in items.items():
                    pipe.set(self._k(key), data, px=px)
                return await pipe.execute()

        await self._call(f"put {len(items)} values", operation)

    async def _get(self, key: str) -> bytes | None:
        value = await self._call(f"get {key!r}", lambda: self._client.get(self._k(key)))
        return None if value is None else _as_bytes(value)

    async def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        names = [self._k(key) for key in keys]
        values = await self._call(f"get {len(keys)} values", lambda: self._client.mget(names))
        return [None if value is None else _as_bytes(value) for value in values]

    async def _exists(self, key: str) -> bool:
        count = await self._call(f"check {key!r}", lambda: self._client.exists(self._k(key)))
        return bool(count)

    async def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        return await self._per_key("EXISTS", keys, f"check {len(keys)} keys")

    async def _per_key(self, command: str, keys: Sequence[str], what: str) -> list[bool]:
        """Run a counting *command* (EXISTS, TOUCH) once per key, in one round trip."""

        async def operation() -> list[Any]:
            # EXISTS / TOUCH k1 k2 ... only return a total; one pipelined command per key
            # gives the per-key answer in the same single round trip.
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.execute_command(command, self._k(key))
                return await pipe.execute()

        counts = await self._call(what, operation)
        return [bool(count) for count in counts]

    async def _delete(self, keys: Sequence[str]) -> int:
        names = [self._k(key) for key in keys]
        # UNLINK frees large values in a background thread instead of blocking the server.
        count = await self._call(f"delete {len(keys)} keys", lambda: self._client.unlink(*names))
        return int(count)

    async def _touch_many(self, keys: Sequence[str]) -> list[bool]:
        return await self._per_key("TOUCH", keys, f"touch {len(keys)} keys")

    async def _delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        # The LRU clock counts whole seconds and a key's idle time may read up to one
        # second more than has passed: round up and add one so nothing goes early.
        seconds = str(math.ceil(idle) + 1)
        gone: list[str] = []
        for start in range(0, len(keys), _IDLE_BATCH):
            batch = keys[start : start + _IDLE_BATCH]
            names = [self._k(key) for key in batch]

            async def operation(names: list[bytes] = names) -> list[Any]:
                return list(await self._delete_idle_script(keys=names, args=[seconds]))

            indexes = await self._call(f"delete idle among {len(batch)} keys", operation)
            gone.extend(batch[int(index) - 1] for index in indexes)
        return gone

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        pattern = _glob_escape(self.prefix + prefix).encode("ascii") + b"*"
        strip = len(self._prefix_bytes)
        seen: set[bytes] = set()  # SCAN may return a key more than once
        cursor = 0
        while True:

            async def step(cursor: int = cursor) -> tuple[int, list[bytes | str]]:
                reply = await self._client.scan(cursor, match=pattern, count=_SCAN_COUNT)
                return int(reply[0]), list(reply[1])

            cursor, names = await self._call(f"scan prefix {prefix!r}", step)
            for name in map(_as_bytes, names):
                if name in seen:
                    continue
                seen.add(name)
                key = name[strip:].decode("ascii", errors="replace")
                # Only keys acall could have written; anything else under the prefix
                # is not ours to hand out.
                if KEY_PATTERN.fullmatch(key) is not None:
                    yield key
            if cursor == 0:
                return

    async def _close(self) -> None:
        await self._redis.close()
