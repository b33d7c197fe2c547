"""Brokers: durable invocation records plus at-least-once queues.

Pick a backend by URL with :func:`open_broker`:

* ``memory://`` — a private broker in this process; ``memory://name`` shares records and
  queues with every other ``memory://name`` broker in the process;
* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` — one SQLite file,
  shareable by the worker and client processes of one machine;
* ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) — Redis
  Streams, with query options ``prefix=`` (default ``acall:b:``; the data store's
  default is ``acall:``) and ``record_ttl=`` (seconds finished records are kept,
  default 7 days; pending ones never expire).

Every backend implements :class:`Broker`. :class:`RedisBroker` needs the ``redis``
package (``pip install 'acall[redis]'``) and is imported on first use.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Final

from acall._redis import redact_url
from acall.brokers.base import Broker, Delivery
from acall.brokers.memory import MemoryBroker
from acall.brokers.sqlite import SqliteBroker
from acall.errors import ConfigurationError
from acall.stores.base import store_options

if TYPE_CHECKING:
    from acall.brokers.redis import RedisBroker

__all__ = [
    "Broker",
    "Delivery",
    "MemoryBroker",
    "RedisBroker",
    "SqliteBroker",
    "open_broker",
]

_ACCEPTED: Final = (
    "memory:// or memory://name; sqlite:///relative/path.db or sqlite:////absolute/path.db; "
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:b:&record_ttl=SECONDS] "
    "(rediss:// for TLS)"
)


def open_broker(url: str, **options: object) -> Broker:
    """Return a broker for *url*; keyword *options* override the URL's query options.

    No connection is made yet: the first operation connects (and reports
    :class:`~acall.errors.BrokerUnavailableError` if it cannot).

    :raises ConfigurationError: for an unknown scheme, a malformed URL, an unknown or
        invalid option, or a Redis URL when the ``redis`` package is not installed.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"broker URL must be a str, got {type(url).__name__}; accepted forms: {_ACCEPTED}"
        )
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(
            f"malformed broker URL {redact_url(url)!r}; accepted forms: {_ACCEPTED}"
        )
    if scheme == "memory":
        return _open_memory(url, rest, options)
    if scheme == "sqlite":
        return SqliteBroker.from_url(url, **options)
    if scheme in ("redis", "rediss"):
        return _redis_broker_class().from_url(url, **options)
    raise ConfigurationError(
        f"unknown broker URL scheme {scheme!r} in {redact_url(url)!r}; accepted forms: {_ACCEPTED}"
    )


def _open_memory(url: str, rest: str, options: dict[str, object]) -> MemoryBroker:
    name, _, query = rest.partition("?")
    if "/" in name or "#" in name:
        raise ConfigurationError(
            f"malformed memory broker URL {url!r}: expected memory:// or memory://name"
        )
    merged = store_options(url, query, options, {"record_ttl": float})
    return MemoryBroker(urllib.parse.unquote(name) or None, **merged)  # type: ignore[arg-type]


def _redis_broker_class() -> type[RedisBroker]:
    try:
        from acall.brokers.redis import RedisBroker
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "redis":
            raise
        raise ConfigurationError(
            "Redis brokers need the redis package (redis-py >= 5), which is not installed; "
            "install it with: pip install 'acall[redis]'"
        ) from exc
    return RedisBroker


def __getattr__(name: str) -> object:
    # RedisBroker is imported lazily so acall.brokers works without the redis package.
    if name == "RedisBroker":
        return _redis_broker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
