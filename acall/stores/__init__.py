"""Async data stores (``key -> bytes``) for offloaded argument values and results.

Pick a backend by URL with :func:`open_store`:

* ``memory://`` — a private store in this process; ``memory://name`` shares its data
  with every other ``memory://name`` store in the process;
* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` — one SQLite file,
  shareable by several processes on one machine;
* ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) — Redis, with
  query options ``prefix=`` (default ``acall:data:``) and ``ttl=`` (default expiry, seconds).

Every backend implements :class:`Store`. :class:`RedisStore` needs the ``redis``
package (``pip install 'acall[redis]'``) and is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from acall._backend_urls import open_backend, redis_class
from acall.errors import ConfigurationError
from acall.stores.base import KEY_PATTERN, Store, validate_key
from acall.stores.memory import MemoryStore
from acall.stores.sqlite import SqliteStore

if TYPE_CHECKING:
    from acall.stores.redis import RedisStore

__all__ = [
    "KEY_PATTERN",
    "MemoryStore",
    "RedisStore",
    "SqliteStore",
    "Store",
    "open_store",
    "validate_key",
]

_ACCEPTED: Final = (
    "memory:// or memory://name; sqlite:///relative/path.db or sqlite:////absolute/path.db; "
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:data:&ttl=SECONDS] "
    "(rediss:// for TLS)"
)


def open_store(url: str, **options: object) -> Store:
    """Return a store for *url*; keyword *options* override the URL's query options.

    No connection is made yet: the first operation connects (and reports
    :class:`~acall.errors.StoreUnavailableError` if it cannot).

    :raises ConfigurationError: for an unknown scheme, a malformed URL, an unknown or
        invalid option, or a Redis URL when the ``redis`` package is not installed.
    """
    store: Store = open_backend(
        url,
        options,
        what="store",
        accepted=_ACCEPTED,
        memory=MemoryStore,
        memory_options={"ttl": float, "max_value_size": int},
        sqlite=SqliteStore.from_url,
        redis=_redis_store_class,
    )
    return store


def _redis_store_class() -> type[RedisStore]:
    cls: type[RedisStore] = redis_class("acall.stores.redis", "RedisStore", "store")
    return cls


def __getattr__(name: str) -> object:
    # RedisStore is imported lazily so acall.stores works without the redis package.
    if name == "RedisStore":
        try:
            return _redis_store_class()
        except ConfigurationError as exc:
            # An import statement should fail with an ImportError, carrying the hint.
            raise ImportError(str(exc), name="redis") from exc.__cause__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
