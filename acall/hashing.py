"""The canonical ``args_id`` rule and content keys for offloaded values.

Both are part of the wire format shared with pynenc and rustvello: every process in a
mixed cluster must compute the same bytes, so nothing here is configurable.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Final

from acall.errors import InvalidKeyError, SerializationError
from acall.ids import NO_ARGS

__all__ = [
    "REFERENCE_PREFIX",
    "compute_args_id",
    "content_reference",
    "is_reference",
    "validate_reference",
]

#: Prefix of a reference to an offloaded value (pynenc's ``ReservedKeys.CLIENT_DATA``).
REFERENCE_PREFIX: Final = "__pynenc__client_data__:"
_REFERENCE_RE: Final = re.compile(r"__pynenc__client_data__:[0-9a-f]{64}")

# ``json.dumps(s, ensure_ascii=False)`` builds a JSONEncoder on every call and ends in
# this C function; calling it directly gives the same text several times faster.
_encode: Final = encode_basestring


def compute_args_id(serialized_args: Mapping[str, str]) -> str:
    """Return the canonical ``args_id`` of a call's serialized arguments.

    Empty arguments give ``"no_args"``. Otherwise the result is the lowercase hex SHA-256
    of, for each key in sorted order, ``JSON(key) + "=" + JSON(value) + ";"`` encoded as
    UTF-8, where ``JSON(s)`` is ``json.dumps(s, ensure_ascii=False)``.

    :raises SerializationError: if a key or value is not a ``str`` or cannot be encoded
        as UTF-8 (a lone surrogate).
    """
    if not serialized_args:
        return NO_ARGS
    try:
        text = "".join(
            [f"{_encode(key)}={_encode(serialized_args[key])};" for key in sorted(serialized_args)]
        )
        data = text.encode("utf-8")
    except (TypeError, UnicodeEncodeError):
        _raise_args_id_error(serialized_args)
        raise  # pragma: no cover - _raise_args_id_error always raises
    return hashlib.sha256(data).hexdigest()


def _raise_args_id_error(serialized_args: Mapping[str, str]) -> None:
    """Find the offending key or value and raise a precise error about it."""
    for key in serialized_args:
        if not isinstance(key, str):
            raise SerializationError(
                f"serialized argument names must be str; got {type(key).__name__} {key!r:.80}",
                type_name=type(key).__qualname__,
            )
    for key in sorted(serialized_args):
        value = serialized_args[key]
        if not isinstance(value, str):
            raise SerializationError(
                f"serialized argument {key!r:.80} must be a str (the serializer's output "
                f"or a reference); got {type(value).__name__} {value!r:.80}",
                type_name=type(value).__qualname__,
            )
        for what, text in (("name", key), ("value", value)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SerializationError(
                    f"serialized argument {what} of {key!r:.80} contains a lone surrogate "
                    f"{text[exc.start]!r} at index {exc.start} and cannot be UTF-8 encoded; "
                    "an args_id is never computed from such text"
                ) from None
    raise SerializationError("serialized arguments could not be hashed")  # pragma: no cover


def content_reference(serialized: str) -> str:
    """Return the reference under which a serialized value is offloaded.

    ``"__pynenc__client_data__:" + sha256(serialized.encode("utf-8")).hexdigest()``.
    """
    return REFERENCE_PREFIX + hashlib.sha256(serialized.encode("utf-8")).hexdigest()


def is_reference(value: str) -> bool:
    """Return whether a serialized argument value is a well-formed content reference."""
    return value.startswith(REFERENCE_PREFIX) and _REFERENCE_RE.fullmatch(value) is not None


def validate_reference(value: str) -> str:
    """Return *value* if it is a well-formed reference, else raise.

    Every store calls this before a reference reaches a path, a SQL statement or a Redis
    key, so a crafted value can never address anything but a content blob.

    :raises InvalidKeyError: naming the rejected value.
    """
    if isinstance(value, str) and _REFERENCE_RE.fullmatch(value) is not None:
        return value
    raise InvalidKeyError(
        f"invalid content reference {value!r:.120}: expected "
        "'__pynenc__client_data__:' followed by 64 lowercase hex digits"
    )
