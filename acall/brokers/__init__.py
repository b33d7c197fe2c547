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

from typing import TYPE_CHECKING, Final

from acall._backend_urls import open_backend, redis_class
from acall.brokers.base import Broker, DamagedRecord, Delivery
from acall.brokers.memory import MemoryBroker
from acall.brokers.sqlite import SqliteBroker

if TYPE_CHECKING:
    from acall.brokers.redis import RedisBroker

__all__ = [
    "Broker",
    "DamagedRecord",
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
    broker: Broker = open_backend(
        url,
        options,
        what="broker",
        accepted=_ACCEPTED,
        memory=MemoryBroker,
        memory_options={"record_ttl": float},
        sqlite=SqliteBroker.from_url,
        redis=_redis_broker_class,
    )
    return broker


def _redis_broker_class() -> type[RedisBroker]:
    cls: type[RedisBroker] = redis_class("acall.brokers.redis", "RedisBroker", "broker")
    return cls


def __getattr__(name: str) -> object:
    # RedisBroker is imported lazily so acall.brokers works without the redis package.
    if name == "RedisBroker":
        return _redis_broker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
