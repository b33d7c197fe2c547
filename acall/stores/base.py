"""The abstract data-store interface: async ``key -> bytes`` with optional TTLs.

Every public method of :class:`Store` validates its input (keys, values, TTLs) and then
calls a protected ``_method`` that a backend implements, so a malformed key can never
reach a file path, a SQL statement or a Redis command, whatever the backend.
"""

from __future__ import annotations

import abc
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, Self, TypeGuard, cast

from acall._native import native_function
from acall.errors import ConfigurationError, InvalidKeyError, StoreError, short_repr

__all__ = [
    "KEY_PATTERN",
    "MiB",
    "Store",
    "Value",
    "is_key",
    "store_options",
    "validate_key",
    "validate_max_value_size",
    "validate_ttl",
]

#: Every key a store accepts matches this pattern (content references do).
KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,256}")
_PREFIX_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{0,256}")
_KEY_RULE: Final = "1 to 256 characters from A-Z, a-z, 0-9 and '_', '.', ':', '-'"

#: The value types :meth:`Store.put` accepts.
Value = bytes | bytearray | memoryview

MiB: Final = 1024 * 1024


def _is_key_by_pattern(value: object) -> TypeGuard[str]:
    """Whether *value* is a str that :data:`KEY_PATTERN` matches in full."""
    return isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None


def _key_check_agrees(is_key: Callable[[object], bool]) -> bool:
    """Whether the native *is_key* agrees with the pattern, on probes."""
    probes = ("ab-c_d.e:F9", "a b", "", "x" * 256, "x" * 257, "é", "a\n", 5, None)
    return all(is_key(probe) is _is_key_by_pattern(probe) for probe in probes)


#: is_key(value): whether *value* is a str that :data:`KEY_PATTERN` matches in full.
#: Checked with a table in the C extension where it is built (ids and queue names are
#: checked several times for every invocation), else with the pattern.
is_key: Final = cast(
    "Callable[[object], TypeGuard[str]]",
    native_function("is_key", _key_check_agrees) or _is_key_by_pattern,
)


def validate_key(key: object) -> str:
    """Return *key* if it is a valid store key, else raise.

    :raises InvalidKeyError: naming the rejected key.
    """
    if is_key(key):
        return key
    if not isinstance(key, str):
        raise InvalidKeyError(
            f"invalid store key {short_repr(key)}: keys must be str, got {type(key).__name__}"
        )
    raise InvalidKeyError(f"invalid store key {key!r:.120}: keys must be {_KEY_RULE}")


def _validate_prefix(prefix: object) -> str:
    if isinstance(prefix, str) and _PREFIX_PATTERN.fullmatch(prefix) is not None:
        return prefix
    raise InvalidKeyError(
        f"invalid scan prefix {short_repr(prefix)}: a prefix must be empty or a valid key "
        f"start ({_KEY_RULE})"
    )


def validate_ttl(ttl: object, *, what: str = "ttl") -> float | None:
    """Return *ttl* as a float number of seconds (``None`` stays ``None``), else raise.

    :raises ConfigurationError: if *ttl* is not a finite positive number.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ConfigurationError(
            f"{what} must be a positive number of seconds or None, got {type(ttl).__name__} "
            f"{ttl!r:.80}"
        )
    seconds = float(ttl)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{what} must be a finite positive number of seconds, got {ttl!r}; pass None "
            "for no expiry"
        )
    return seconds


def validate_max_value_size(size: object) -> int:
    """Return *size* if it is a positive int, else raise :class:`ConfigurationError`."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigurationError(f"max_value_size must be a positive int, got {size!r:.80}")
    return size


class Store(abc.ABC):
    """An async ``key -> bytes`` data store holding offloaded values and results.

    Keys must match :data:`KEY_PATTERN`; values are ``bytes`` (``bytearray`` and
    ``memoryview`` are copied on the way in). Writes are atomic per key: a reader sees a
    whole value or none. A store is an async context manager that closes on exit.

    :ivar url: where the store lives, with any password redacted.
    :ivar max_value_size: the largest single value this backend takes comfortably;
        callers split larger values into chunks. Larger puts raise :class:`StoreError`.
    :ivar default_ttl: expiry in seconds applied when a put passes ``ttl=None``.
    """

    url: str
    max_value_size: int
    default_ttl: float | None

    def __init__(self, url: str, *, max_value_size: int, default_ttl: float | None) -> None:
        self.url = url
        self.max_value_size = validate_max_value_size(max_value_size)
        self.default_ttl = validate_ttl(default_ttl, what="default ttl")
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.url!r}{state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    # -- public API: validation, then the backend ---------------------------------------

    async def put(self, key: str, data: Value, *, ttl: float | None = None) -> None:
        """Store *data* under *key* atomically, replacing any previous value.

        :param ttl: seconds until the value expires; ``None`` uses the store's default.
        :raises InvalidKeyError: if *key* is malformed (before any backend call).
        :raises TypeError: if *data* is not bytes-like.
        :raises StoreError: if *data* exceeds :attr:`max_value_size`.
        :raises StoreUnavailableError: if the backend cannot be reached.
        """
        key = validate_key(key)
        value = self._check_value(key, data)
        seconds = self._effective_ttl(ttl)
        self._check_open()
        await self._put(key, value, seconds)

    async def put_many(self, items: Mapping[str, Value], *, ttl: float | None = None) -> None:
        """Store several values in one round trip; each key is written atomically.

        Every key and value is validated before anything is written.
        """
        checked = {validate_key(key): data for key, data in items.items()}
        values = {key: self._check_value(key, data) for key, data in checked.items()}
        seconds = self._effective_ttl(ttl)
        self._check_open()
        if values:
            await self._put_many(values, seconds)

    async def get(self, key: str) -> bytes | None:
        """Return the value stored under *key*, or ``None`` if it is missing or expired."""
        key = validate_key(key)
        self._check_open()
        return await self._get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of *keys* in the same order (``None`` for missing ones).

        One round trip to the backend, however many keys.
        """
        checked = [validate_key(key) for key in _as_key_list(keys)]
        self._check_open()
        if not checked:
            return []
        return await self._get_many(checked)

    async def exists(self, key: str) -> bool:
        """Return whether *key* holds a (non-expired) value."""
        key = validate_key(key)
        self._check_open()
        return await self._exists(key)

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Return, for each of *keys* in order, whether it holds a value (one round trip)."""
        checked = [validate_key(key) for key in _as_key_list(keys)]
        self._check_open()
        if not checked:
            return []
        return await self._exists_many(checked)

    async def delete(self, *keys: str) -> int:
        """Delete *keys* and return how many held a value (duplicates count once)."""
        checked = list(dict.fromkeys(validate_key(key) for key in keys))
        self._check_open()
        if not checked:
            return 0
        return await self._delete(checked)

    async def touch_many(self, keys: Sequence[str]) -> list[bool]:
        """Mark *keys* as just used and return, for each in order, whether it exists.

        A key's *idle time* counts from its last write or touch (Redis also counts
        reads). A writer that reuses a stored value instead of writing it again touches
        it, so :meth:`delete_idle` (the blob collector) cannot remove it in between.
        """
        checked = [validate_key(key) for key in _as_key_list(keys)]
        self._check_open()
        if not checked:
            return []
        return await self._touch_many(checked)

    async def delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        """Delete those of *keys* idle for at least *idle* seconds; return the deleted ones.

        The check and the delete are atomic per key: a key written or touched
        concurrently is either kept or deleted before that write (which then stands).
        Missing keys are skipped.

        :raises ConfigurationError: if *idle* is not a finite positive number.
        """
        checked = list(dict.fromkeys(validate_key(key) for key in _as_key_list(keys)))
        seconds = validate_ttl(idle, what="idle")
        assert seconds is not None
        self._check_open()
        if not checked:
            return []
        return await self._delete_idle(checked, seconds)

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Yield every key starting with *prefix* (each once, in no particular order).

        Meant for cleanup and inspection, not for hot paths. Iterate it to the end or
        close it (``contextlib.aclosing``) so the backend cursor is released promptly.
        """
        prefix = _validate_prefix(prefix)
        self._check_open()
        async for key in self._scan(prefix):
            yield key

    async def close(self) -> None:
        """Release connections and threads; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._close()

    async def __aenter__(self) -> Self:
        """Return the store itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.close()

    # -- backend hooks: inputs are already validated --------------------------------------

    @abc.abstractmethod
    async def _put(self, key: str, data: bytes, ttl: float | None) -> None:
        """Store one value; *ttl* is the effective expiry in seconds or ``None``."""

    @abc.abstractmethod
    async def _put_many(self, items: Mapping[str, bytes], ttl: float | None) -> None:
        """Store a non-empty mapping of values in one round trip."""

    @abc.abstractmethod
    async def _get(self, key: str) -> bytes | None:
        """Return one value or ``None``."""

    @abc.abstractmethod
    async def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return values for a non-empty key list, in order."""

    @abc.abstractmethod
    async def _exists(self, key: str) -> bool:
        """Return whether one key holds a value."""

    @abc.abstractmethod
    async def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Return existence for a non-empty key list, in order."""

    @abc.abstractmethod
    async def _delete(self, keys: Sequence[str]) -> int:
        """Delete a non-empty list of distinct keys; return how many held a value."""

    @abc.abstractmethod
    async def _touch_many(self, keys: Sequence[str]) -> list[bool]:
        """Reset the idle time of a non-empty key list; return existence, in order."""

    @abc.abstractmethod
    async def _delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        """Delete the distinct *keys* idle for at least *idle* seconds; return them."""

    @abc.abstractmethod
    def _scan(self, prefix: str) -> AsyncIterator[str]:
        """Yield the keys that start with a validated (possibly empty) prefix."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Release resources; called once."""

    # -- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(
                f"store {self.url} is closed; open a new one with acall.stores.open_store()"
            )

    def _check_value(self, key: str, data: object) -> bytes:
        if isinstance(data, bytes):
            value = data
        elif isinstance(data, bytearray | memoryview):
            # A snapshot: the caller may reuse its buffer as soon as put() returns.
            value = bytes(data)
        else:
            raise TypeError(
                f"value for store key {key!r} must be bytes, bytearray or memoryview, "
                f"got {type(data).__name__}"
            )
        if len(value) > self.max_value_size:
            raise StoreError(
                f"value for store key {key!r} is {len(value)} bytes, more than this store's "
                f"max_value_size ({self.max_value_size} bytes, {self.url}); split it into "
                "chunks below that size"
            )
        return value

    def _effective_ttl(self, ttl: float | None) -> float | None:
        return self.default_ttl if ttl is None else validate_ttl(ttl)


def store_options(
    url: str,
    query: str,
    options: Mapping[str, object],
    converters: Mapping[str, Callable[[str], object]],
    *,
    what: str = "store",
) -> dict[str, object]:
    """Merge a URL's query options with keyword options (keywords win).

    Query values are converted with *converters* (keyed by option name); keyword values
    are passed through for the backend's constructor to validate.

    :param what: "store" or "broker", for messages.
    :raises ConfigurationError: for an unknown, repeated or unconvertible option.
    """
    accepted = ", ".join(sorted(converters)) or "none"
    merged: dict[str, object] = {}
    for name, raw in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in converters:
            raise ConfigurationError(
                f"unknown option {name!r} in {what} URL {url}; accepted options: {accepted}"
            )
        if name in merged:
            raise ConfigurationError(f"option {name!r} is given twice in {what} URL {url}")
        try:
            merged[name] = converters[name](raw)
        except ValueError:
            raise ConfigurationError(
                f"invalid value {raw!r:.80} for option {name!r} in {what} URL {url}"
            ) from None
    for name, value in options.items():
        if name not in converters:
            raise ConfigurationError(
                f"unknown option {name!r} for {what} {url}; accepted options: {accepted}"
            )
        merged[name] = value
    return merged


def _as_key_list(keys: Sequence[str]) -> Sequence[str]:
    # A bare str is a Sequence[str] too; treating it as characters would be a silent bug.
    if isinstance(keys, str):
        raise InvalidKeyError(
            f"expected a sequence of keys, got the single str {keys!r:.120}; wrap it in a list"
        )
    return keys
