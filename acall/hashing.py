"""The canonical ``args_id`` rule and content keys for offloaded values.

Both are part of the wire format shared with pynenc and rustvello: every process in a
mixed cluster must compute the same bytes, so nothing here is configurable.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring
from typing import Final

from acall._native import native_function
from acall.errors import InvalidKeyError, SerializationError, short_repr
from acall.ids import NO_ARGS

__all__ = [
    "REFERENCE_PATTERN",
    "REFERENCE_PREFIX",
    "compute_args_id",
    "content_reference",
    "is_reference",
    "validate_reference",
]

#: Prefix of a reference to an offloaded value (pynenc's ``ReservedKeys.CLIENT_DATA``).
REFERENCE_PREFIX: Final = "__pynenc__client_data__:"
#: What a well-formed reference looks like (``fullmatch`` it; ``findall`` finds them in text).
REFERENCE_PATTERN: Final = re.compile(r"__pynenc__client_data__:[0-9a-f]{64}")

# ``json.dumps(s, ensure_ascii=False)`` builds a JSONEncoder on every call and ends in
# this C function; calling it directly gives the same text several times faster.
_encode: Final = encode_basestring
_sha256: Final = hashlib.sha256


# Arguments longer than this in all are hashed piece by piece (fewer copies in memory).
_LARGE: Final = 65536

# Calls of one task share their argument names, so the sorted order and the escaped
# ``JSON(key)=`` prefixes are computed once per name tuple (bounded cache).
_layouts: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}
_LAYOUTS_MAX: Final = 4096


def _args_text_agrees(args_text: Callable[[Mapping[str, str]], bytes]) -> bool:
    """Whether the native *args_text* builds the bytes the Python rule does, on a probe."""
    probe = {"b": 'x"\\\n\x7f\x01é€😀', "a": "1", "é": "[1, 2]", "": ""}
    expected = "".join(f"{_encode(k)}={_encode(probe[k])};" for k in sorted(probe)).encode()
    return args_text(probe) == expected


#: ``acall._speedups.args_text``: the hashed bytes of a dict of str, built in one C call
#: (sorting, escaping and UTF-8 at once), or ``None``: the Python rule below.
_ARGS_TEXT: Final[Callable[[Mapping[str, str]], bytes] | None] = native_function(
    "args_text", _args_text_agrees
)

_Layout = tuple[tuple[str, str], ...]
# The most recent layout, checked before the dict: one tuple, swapped whole, so threads
# never see keys paired with another call's layout.
_last: tuple[tuple[str, ...], _Layout] = ((), ())


# Only layouts of at most this many names, of this many characters in all, are cached:
# names also come from decoded (untrusted) documents, and a cache bounded by its entry
# count alone kept every huge name list it was shown (4096 x megabytes).
_CACHED_NAMES: Final = 64
_CACHED_CHARS: Final = 1024


def _cacheable(keys: tuple[str, ...]) -> bool:
    return len(keys) <= _CACHED_NAMES and sum(map(len, keys)) <= _CACHED_CHARS


def _layout(keys: tuple[str, ...]) -> _Layout:
    layout = tuple((key, _encode(key) + "=") for key in sorted(keys))
    if _cacheable(keys):
        if len(_layouts) >= _LAYOUTS_MAX:
            _layouts.clear()
        _layouts[keys] = layout
    return layout


def compute_args_id(serialized_args: Mapping[str, str]) -> str:
    """Return the canonical ``args_id`` of a call's serialized arguments.

    Empty arguments give ``"no_args"``. Otherwise the result is the lowercase hex SHA-256
    of, for each key in sorted order, ``JSON(key) + "=" + JSON(value) + ";"`` encoded as
    UTF-8, where ``JSON(s)`` is ``json.dumps(s, ensure_ascii=False)``.

    :raises SerializationError: if a key or value is not a ``str`` or cannot be encoded
        as UTF-8 (a lone surrogate).
    """
    global _last
    if not serialized_args:
        return NO_ARGS
    try:
        if len(serialized_args) == 1:
            # One argument: checking its size first is free, and a large value is then
            # escaped at the byte level instead of by the (much slower) str escaper.
            ((key, value),) = serialized_args.items()
            if len(value) > _LARGE:
                return _single_large(key, value)
        if _ARGS_TEXT is not None:
            try:
                return _sha256(_ARGS_TEXT(serialized_args)).hexdigest()
            except (TypeError, ValueError, RuntimeError):
                pass  # not a dict of encodable str: the Python rule decides, and reports
        keys = tuple(serialized_args)
        last_keys, layout = _last
        if keys != last_keys:
            layout = _layouts.get(keys) or _layout(keys)
            if len(layout) <= _CACHED_NAMES:
                _last = (keys, layout)
        parts = [prefix + _encode(serialized_args[key]) for key, prefix in layout]
        # Joining with ";" and appending one more gives exactly the concatenation of
        # "key=value;" items, one string operation less than formatting each item.
        text = ";".join(parts)
        if len(text) > _LARGE:
            # Large: hash the escaped pieces one by one rather than copying them again.
            hasher = _sha256()
            for part in parts:
                hasher.update(part.encode("utf-8"))
                hasher.update(b";")
            return hasher.hexdigest()
        data = (text + ";").encode()
    except (TypeError, AttributeError, UnicodeEncodeError):
        _raise_args_id_error(serialized_args)
        raise  # pragma: no cover - _raise_args_id_error always raises
    return _sha256(data).hexdigest()


_CONTROL_BYTES: Final = bytes(range(32))


def _single_large(key: str, value: str) -> str:
    hasher = _sha256(_encode(key).encode("utf-8") + b"=")
    raw = value.encode("utf-8")
    if len(raw.translate(None, _CONTROL_BYTES)) == len(raw):
        # Without control characters only '"' and '\\' are escaped, and the bytes of a
        # UTF-8 multi-byte sequence are never those, so escaping the bytes is exact.
        hasher.update(b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'";')
    else:
        hasher.update(_encode(value).encode("utf-8") + b";")
    return hasher.hexdigest()


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
    return value.startswith(REFERENCE_PREFIX) and REFERENCE_PATTERN.fullmatch(value) is not None


def validate_reference(value: str) -> str:
    """Return *value* if it is a well-formed reference, else raise.

    Every store calls this before a reference reaches a path, a SQL statement or a Redis
    key, so a crafted value can never address anything but a content blob.

    :raises InvalidKeyError: naming the rejected value.
    """
    if isinstance(value, str) and REFERENCE_PATTERN.fullmatch(value) is not None:
        return value
    # short_repr bounds the repr: a value taken from data may be a deeply nested list,
    # whose plain repr() raises RecursionError (and a long str is copied whole).
    shown = short_repr(value) if isinstance(value, str) else _describe(value)
    raise InvalidKeyError(
        f"invalid content reference {shown}: expected "
        "'__pynenc__client_data__:' followed by 64 lowercase hex digits"
    )


def _describe(value: object) -> str:
    return f"{short_repr(value)} (a {type(value).__name__}, not a str)"
