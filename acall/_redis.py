"""Redis plumbing shared by :class:`~acall.stores.RedisStore` and
:class:`~acall.brokers.RedisBroker`, and the password redaction of every URL acall shows.

This module imports without redis-py: :func:`redact_url` serves every backend (and
:func:`~acall.stores.open_store` / :func:`~acall.brokers.open_broker` must report a bad
URL even where redis-py is missing), and the URL and settings checks are plain Python.
redis-py is imported by :class:`RedisConnection`, which only the Redis backends create.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from acall.errors import AcallError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection

__all__ = [
    "CONNECTION_OPTIONS",
    "DEFAULT_PORT",
    "RedisConnection",
    "check_settings",
    "packed_by_hiredis",
    "redact_url",
    "shown_url",
    "url_arguments",
]

_T = TypeVar("_T")

DEFAULT_PORT: Final = 6379

#: Query options both Redis backends accept, with their converters.
CONNECTION_OPTIONS: Final[Mapping[str, Callable[[str], object]]] = {
    "prefix": str,
    "retries": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "max_connections": int,
    "ssl_ca_certs": str,
    "ssl_cert_reqs": str,
}

_PREFIX_RE: Final = re.compile(r"[!-~]{0,200}")  # printable ASCII, no spaces
_AUTHORITY_END: Final = re.compile(r"[/?#]")


def redact_url(url: str) -> str:
    """Return *url* with any password in its user-info part replaced by ``***``.

    Works on any text, well-formed URL or not, so a message about a malformed URL never
    echoes a password. The user-info ends at the last ``@`` of the authority (passwords
    may contain ``@``). When the authority does not parse as ``host[:port]`` while an
    ``@`` follows it (a password holding an unescaped ``/``, ``?`` or ``#``), everything
    up to the last ``@`` of the text is treated as user-info: hiding too much beats
    showing a password.
    """
    scheme, sep, rest = url.partition("://")
    head = scheme + sep
    if not sep:
        head, rest = "", url
    end = _AUTHORITY_END.search(rest)
    authority = rest if end is None else rest[: end.start()]
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        later = rest.rfind("@")
        if later < 0 or _looks_like_hostport(authority):
            return url
        userinfo, hostport = rest[:later], rest[later + 1 :]
        tail = ""
    else:
        tail = rest[len(authority) :]
    user, colon, _ = userinfo.partition(":")
    return f"{head}{user}{':***' if colon else ''}@{hostport}{tail}"


def _looks_like_hostport(authority: str) -> bool:
    _, colon, port = authority.rpartition(":")
    if not colon:
        return True
    # An IPv6 literal ("[::1]") has colons of its own.
    return (port.isascii() and port.isdigit()) or (authority.startswith("[") and "]" in port)


def check_settings(
    *,
    prefix: object,
    default_prefix: str,
    port: object,
    db: object,
    retries: object,
    max_connections: object,
    socket_timeout: object,
    socket_connect_timeout: object,
    ssl_cert_reqs: object,
) -> None:
    """Check the connection settings both Redis backends take.

    :raises ConfigurationError: naming the first bad setting.
    """
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ConfigurationError(
            f"invalid Redis key prefix {prefix!r:.80}: use up to 200 printable ASCII "
            f"characters without spaces (the default is {default_prefix!r})"
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


def shown_url(
    url: str | None,
    *,
    ssl: bool,
    username: str | None,
    password: str | None,
    host: str,
    port: int,
    db: int,
) -> str:
    """The URL a backend shows: *url* (or one built from the parts), password redacted."""
    if url is None:
        scheme = "rediss" if ssl else "redis"
        auth = ""
        if username or password:
            auth = f"{username or ''}{':***' if password else ''}@"
        url = f"{scheme}://{auth}{host}:{port}/{db}"
    return redact_url(url)


def url_arguments(
    url: str,
    options: Mapping[str, object],
    converters: Mapping[str, Callable[[str], object]],
    url_forms: str,
    *,
    what: str = "store",
) -> dict[str, object]:
    """Turn ``redis://[[user]:password@]host[:port][/db][?query]`` (or ``rediss://``)
    into the keyword arguments of a Redis backend's constructor.

    Query options are converted with *converters*; keyword *options* override them
    (see :func:`acall.stores.base.store_options`). The result has ``host``, ``port``,
    ``db``, ``username``, ``password``, ``ssl`` and ``url`` (without a fragment), then
    the options.

    :raises ConfigurationError: for a malformed URL or option, naming *url_forms*; the
        message never shows the password.
    """
    from acall.stores.base import store_options  # not at import: acall.stores imports us

    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(
            f"malformed Redis URL {shown!r} ({exc}); expected {url_forms}"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"malformed Redis URL {shown!r}: expected {url_forms}")
    if not parts.hostname:
        raise ConfigurationError(
            f"Redis URL {shown!r} names no host; expected {url_forms}, "
            "for example redis://127.0.0.1:6379/0"
        )
    if parts.fragment:
        raise ConfigurationError(f"Redis URL {shown!r} has a '#' fragment; expected {url_forms}")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ConfigurationError(
            f"Redis URL {shown!r}: the path must be a database number like /0, got {parts.path!r}"
        )
    merged = store_options(shown, parts.query, options, converters, what=what)
    base_url = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
    query = f"?{parts.query}" if parts.query else ""
    return {
        "host": parts.hostname,
        "port": port if port is not None else DEFAULT_PORT,
        "db": int(path) if path else 0,
        "username": urllib.parse.unquote(parts.username) if parts.username else None,
        "password": urllib.parse.unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
        "url": base_url + query,
        **merged,
    }


def packed_by_hiredis(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """*base* with commands packed by hiredis (C) when it is installed, else *base*.

    redis-py's asyncio connections pack commands in Python, re-joining a growing
    buffer for each argument: a broker script call carrying 500 records of 7 arguments
    spent about a millisecond there. hiredis packs the same bytes in one C call. Meant
    for clients whose commands are small (one whole copy per command; redis-py's packer
    keeps large values out of the joined buffer).
    """
    known = _PACKED.get(base)
    if known is not None:  # one class per connection class, however many clients open
        return known
    try:
        from hiredis import pack_command
    except ImportError:
        return base

    class HiredisPacked(base):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            name = args[0].decode() if isinstance(args[0], bytes) else args[0]
            # As redis-py does: a command name of several words ('SCRIPT LOAD') is sent
            # as separate arguments.
            if isinstance(name, str) and " " in name:
                args = (*name.split(), *args[1:])
            try:
                return [pack_command(args)]
            except (TypeError, UnicodeError):
                # An argument redis-py refuses with its own error (DataError), or one
                # hiredis does not take: redis-py's packer says which.
                packed: list[bytes] = super().pack_command(*args)
                return packed

    HiredisPacked.__name__ = HiredisPacked.__qualname__ = f"HiredisPacked{base.__name__}"
    _PACKED[base] = HiredisPacked
    return HiredisPacked


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


class RedisConnection:
    """A ``redis.asyncio`` client on a blocking connection pool, and its error reporting.

    The pool makes a burst of concurrent operations wait for a connection instead of
    failing with "Too many connections". Dropped connections are re-dialled with
    jittered exponential backoff, *retries* times, and the command re-sent.

    :param kind: ``"store"`` or ``"broker"``, for the messages.
    :param url: the (redacted) URL messages show.
    :param error: raised by :meth:`call` for a failed command.
    :param unavailable: raised by :meth:`call` when the server cannot be reached or
        refuses the credentials.
    :param small_commands: every command carries small values only (a broker's
        records, not a store's blobs): pack them with hiredis when it is installed.
    :ivar client: the client.
    """

    def __init__(
        self,
        *,
        kind: str,
        url: str,
        host: str,
        port: int,
        db: int,
        username: str | None,
        password: str | None,
        ssl: bool,
        ssl_ca_certs: str | None,
        ssl_cert_reqs: str,
        retries: int,
        socket_timeout: float,
        socket_connect_timeout: float,
        max_connections: int,
        decode_responses: bool,
        error: type[AcallError],
        unavailable: type[AcallError],
        small_commands: bool = False,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.connection import Connection, SSLConnection
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialWithJitterBackoff

        self.kind = kind
        self.url = url
        self.host = host
        self.port = port
        self._error = error
        self._unavailable = unavailable
        connection_class: type[AbstractConnection] = Connection
        tls: dict[str, Any] = {}
        if ssl:
            connection_class = SSLConnection
            tls = {"ssl_ca_certs": ssl_ca_certs, "ssl_cert_reqs": ssl_cert_reqs}
        if small_commands:
            connection_class = packed_by_hiredis(connection_class)
        pool = BlockingConnectionPool(
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
            client_name=f"acall-{kind}",
            decode_responses=decode_responses,
            **tls,
        )
        self.client: Redis = Redis(connection_pool=pool)

    async def call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await *operation*, turning every redis-py failure into an acall error."""
        from redis import exceptions as redis_errors

        try:
            return await operation()
        except redis_errors.AuthenticationError as exc:
            raise self._unavailable(
                f"Redis {self.kind} {self.url} refused our credentials while trying to "
                f"{what}: {exc}; check the user name and password in the {self.kind} URL"
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise self._unavailable(
                f"Redis {self.kind} {self.url} is unreachable (tried to {what}): {exc}; check "
                f"that redis-server is running and reachable at {self.host}:{self.port}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise self._error(
                f"Redis {self.kind} {self.url} failed to {what}: {type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close the client and its pool."""
        await self.client.aclose(close_connection_pool=True)
