"""A data store in Redis, through ``redis.asyncio`` (redis-py >= 5).

Keys are stored as ``prefix + key`` (default prefix ``acall:``). A dropped connection
(a server-side ``CLIENT KILL``, an idle timeout, a short restart) is retried with
jittered exponential backoff, so callers never see it; when the server stays
unreachable the operation raises :class:`~acall.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from acall.errors import ConfigurationError, StoreError, StoreUnavailableError
from acall.stores.base import KEY_PATTERN, MiB, Store, store_options

__all__ = ["RedisStore", "redact_url"]

_T = TypeVar("_T")

_URL_FORMS: Final = (
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:&ttl=SECONDS] (rediss:// for TLS)"
)
_PREFIX_RE: Final = re.compile(r"[!-~]{0,200}")  # printable ASCII, no spaces
_GLOB_SPECIAL: Final = re.compile(r"([\\*?\[\]])")
_PASSWORD_RE: Final = re.compile(r"(?<=//)([^/@]*?):[^/@]*@")
_SCAN_COUNT: Final = 1000
_DEFAULT_PORT: Final = 6379


def redact_url(url: str) -> str:
    """Return *url* with any password in its user-info part replaced by ``***``."""
    return _PASSWORD_RE.sub(r"\1:***@", url)


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
        port: int = _DEFAULT_PORT,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        prefix: str = "acall:",
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
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise ConfigurationError(
                f"invalid Redis key prefix {prefix!r:.80}: use up to 200 printable ASCII "
                "characters without spaces (the default is 'acall:')"
            )
        for name, number, low in (
            ("port", port, 1),
            ("db", db, 0),
            ("retries", retries, 0),
            ("max_connections", max_connections, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < low:
                raise ConfigurationError(f"{name} must be an int >= {low}, got {number!r:.80}")
        for name, seconds in (
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
        ):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, got {seconds!r:.80}"
                )
        if ssl_cert_reqs not in ("required", "optional", "none"):
            raise ConfigurationError(
                f"ssl_cert_reqs must be 'required', 'optional' or 'none', got {ssl_cert_reqs!r}"
            )
        if url is None:
            scheme = "rediss" if ssl else "redis"
            auth = ""
            if username or password:
                auth = f"{username or ''}{':***' if password else ''}@"
            url = f"{scheme}://{auth}{host}:{port}/{db}"
        super().__init__(redact_url(url), max_value_size=max_value_size, default_ttl=ttl)
        self.prefix = prefix
        self.host = host
        self.port = port
        self.db = db
        self._prefix_bytes = prefix.encode("ascii")

        connection_class: type[AbstractConnection] = Connection
        tls: dict[str, Any] = {}
        if ssl:
            connection_class = SSLConnection
            tls = {"ssl_ca_certs": ssl_ca_certs, "ssl_cert_reqs": ssl_cert_reqs}
        # A blocking pool makes a burst of concurrent operations wait for a connection
        # instead of failing with "Too many connections".
        self._pool = BlockingConnectionPool(
            max_connections=max_connections,
            connection_class=connection_class,
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
            client_name="acall-store",
            **tls,
        )
        self._client = Redis(connection_pool=self._pool)

    @classmethod
    def from_url(cls, url: str, **options: object) -> RedisStore:
        """Open ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``).

        Query options: ``prefix``, ``ttl``, ``retries``, ``socket_timeout``,
        ``socket_connect_timeout``, ``max_connections``, ``max_value_size``,
        ``ssl_ca_certs``, ``ssl_cert_reqs``; keyword *options* override them.
        """
        shown = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"malformed Redis URL {shown!r} ({exc}); expected {_URL_FORMS}"
            ) from None
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"malformed Redis URL {shown!r}: expected {_URL_FORMS}")
        if not parts.hostname:
            raise ConfigurationError(
                f"Redis URL {shown!r} names no host; expected {_URL_FORMS}, "
                "for example redis://127.0.0.1:6379/0"
            )
        if parts.fragment:
            raise ConfigurationError(
                f"Redis URL {shown!r} has a '#' fragment; expected {_URL_FORMS}"
            )
        path = parts.path.strip("/")
        if path and not (path.isascii() and path.isdigit()):
            raise ConfigurationError(
                f"Redis URL {shown!r}: the path must be a database number like /0, "
                f"got {parts.path!r}"
            )
        merged = store_options(
            shown,
            parts.query,
            options,
            {
                "prefix": str,
                "ttl": float,
                "retries": int,
                "socket_timeout": float,
                "socket_connect_timeout": float,
                "max_connections": int,
                "max_value_size": int,
                "ssl_ca_certs": str,
                "ssl_cert_reqs": str,
            },
        )
        base_url = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
        query = f"?{parts.query}" if parts.query else ""
        return cls(
            parts.hostname,
            port if port is not None else _DEFAULT_PORT,
            int(path) if path else 0,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss",
            url=base_url + query,
            **merged,  # type: ignore[arg-type]
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _k(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode("ascii")

    @staticmethod
    def _px(ttl: float | None) -> int | None:
        return None if ttl is None else max(1, math.ceil(ttl * 1000))

    async def _call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await *operation*, turning every redis-py failure into an acall error."""
        try:
            return await operation()
        except redis_errors.AuthenticationError as exc:
            raise StoreUnavailableError(
                f"Redis store {self.url} refused our credentials while trying to {what}: "
                f"{exc}; check the user name and password in the store URL"
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"Redis store {self.url} is unreachable (tried to {what}): {exc}; check that "
                f"redis-server is running and reachable at {self.host}:{self.port}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise StoreError(
                f"Redis store {self.url} failed to {what}: {type(exc).__name__}: {exc}"
            ) from exc

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
        async def operation() -> list[Any]:
            # EXISTS k1 k2 ... only returns a total; one pipelined EXISTS per key gives
            # the per-key answer in the same single round trip.
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(self._k(key))
                return await pipe.execute()

        counts = await self._call(f"check {len(keys)} keys", operation)
        return [bool(count) for count in counts]

    async def _delete(self, keys: Sequence[str]) -> int:
        names = [self._k(key) for key in keys]
        # UNLINK frees large values in a background thread instead of blocking the server.
        count = await self._call(f"delete {len(keys)} keys", lambda: self._client.unlink(*names))
        return int(count)

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
        await self._client.aclose(close_connection_pool=True)
