"""Choosing a backend by URL: the part shared by :func:`acall.stores.open_store` and
:func:`acall.brokers.open_broker` (scheme dispatch, memory names, lazy Redis import)."""

from __future__ import annotations

import importlib
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from acall._redis import redact_url
from acall.errors import ConfigurationError

__all__ = ["open_backend", "redis_class"]


def redis_class(module: str, name: str, what: str) -> Any:
    """Import ``module.name`` (a Redis backend) or say how to install redis-py."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "redis":
            raise
        raise ConfigurationError(
            f"Redis {what}s need the redis package (redis-py >= 5), which is not installed; "
            "install it with: pip install 'acall[redis]'"
        ) from exc


def open_backend(
    url: object,
    options: dict[str, object],
    *,
    what: str,
    accepted: str,
    memory: Callable[..., Any],
    memory_options: Mapping[str, type],
    sqlite: Callable[..., Any],
    redis: Callable[[], Any],
) -> Any:
    """Dispatch *url* to the memory, SQLite or Redis constructor of a backend kind.

    :param what: "store" or "broker", for messages.
    :param memory: ``memory(name_or_None, **options)``.
    :param sqlite: ``sqlite(url, **options)`` (a ``from_url`` classmethod).
    :param redis: returns the Redis class (imported lazily), whose ``from_url`` is used.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"{what} URL must be a str, got {type(url).__name__}; accepted forms: {accepted}"
        )
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(
            f"malformed {what} URL {redact_url(url)!r}; accepted forms: {accepted}"
        )
    if scheme == "memory":
        # Imported here: acall.stores itself imports this module.
        from acall.stores.base import store_options

        name, _, query = rest.partition("?")
        if "/" in name or "#" in name:
            raise ConfigurationError(
                f"malformed memory {what} URL {url!r}: expected memory:// or memory://name"
            )
        merged = store_options(url, query, options, dict(memory_options), what=what)
        return memory(urllib.parse.unquote(name) or None, **merged)
    if scheme == "sqlite":
        return sqlite(url, **options)
    if scheme in ("redis", "rediss"):
        return redis().from_url(url, **options)
    raise ConfigurationError(
        f"unknown {what} URL scheme {scheme!r} in {redact_url(url)!r}; accepted forms: {accepted}"
    )
