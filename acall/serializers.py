"""Serializers: turn argument values and results into text and back.

:class:`JsonSerializer` is the default. Its output is byte-identical to pynenc 0.4.0's
``JsonSerializer`` for every type that serializer supports (JSON natives, tuples as
lists, enum / exception / ``to_json`` envelopes), but it is faster and its loader is safe:

* encoding hands whole containers to a C encoder: ujson's for containers built of
  exact builtin types (a native walker in ``acall._speedups``, or ``marshal``, proves
  it, in C), with every place where ujson would write other bytes than ``json.dumps``
  either mended or sent to the stdlib's; the stdlib's otherwise. Large strings are
  escaped in pieces by a native escaper that releases the GIL (the stdlib's where the
  extension was not built). The Python-level pre-pass that wraps ``IntEnum`` / ``StrEnum``
  members in envelopes runs only when a quick scan finds an enum member inside lists,
  tuples or dicts;
* decoding walks the parsed value only when the text contains an envelope marker;
* an envelope is honoured only after the object it names is checked to be of the kind
  the envelope claims (an ``Enum`` subclass, an exception class, a class implementing
  :class:`JsonSerializable`). Nothing is imported unless the serializer is told it may,
  and attributes are looked up without running descriptors or module ``__getattr__``.

:class:`PickleSerializer` is opt-in and **unsafe for untrusted data**: loading a pickle
runs whatever code the pickle names. Use it only between processes you fully trust.
"""

from __future__ import annotations

import base64
import builtins
import importlib
import json
import marshal
import pickle
import re
import reprlib
import sys
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from enum import Enum, Flag
from itertools import chain, compress, islice
from json.encoder import encode_basestring_ascii
from typing import Any, ClassVar, Final, Protocol, TypeGuard, runtime_checkable

from acall._native import native_function
from acall.errors import (
    DeserializationError,
    RemoteTaskError,
    SerializationError,
    UnsafePayloadError,
)

__all__ = [
    "ENUM_KEY",
    "ERROR_KEY",
    "EXCEPTION_KEY",
    "JSON_SERIALIZABLE_KEY",
    "JsonSerializable",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "describe_value",
]

#: Envelope keys, shared with pynenc's ``ReservedKeys``.
ERROR_KEY: Final = "__pynenc__std_py_exc__"
EXCEPTION_KEY: Final = "__pynenc__client_exception__"
JSON_SERIALIZABLE_KEY: Final = "__pynenc__json_serializable__"
ENUM_KEY: Final = "__pynenc__enum__"
_ENVELOPE_MARKER: Final = "__pynenc__"

_REPR_LIMIT: Final = 200

# loads() shortcuts for short texts (see there).
_SHORT: Final = 64
_LITERALS: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}
_SMALL_INT: Final = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")


def _stdlib_escape_range(text: str, start: int, stop: int) -> str:
    return str(encode_basestring_ascii(text[start:stop]))[1:-1]


def _escaper_agrees(escape: Callable[[str, int, int], str]) -> bool:
    """Whether the native *escape* gives the stdlib's escape, on a probe."""
    probe = 'plain "quoted" \\ \x00\x1f\x7f\n\r\t\b\f é € \ud800 \U0001f600 \U0010ffff end'
    return escape(probe, 6, len(probe) - 4) == _stdlib_escape_range(probe, 6, len(probe) - 4)


def _range_escaper() -> Callable[[str, int, int], str]:
    """``escape(text, start, stop)``: the JSON escape of ``text[start:stop]`` as
    ``json.dumps`` writes it, without the quotes.

    The native one (``acall._speedups``, built from C when the package is installed)
    runs about 1.8 times as fast as the stdlib's and releases the GIL while it works, so
    a worker thread escaping a 100 MB string holds up neither the event loop nor the
    threads hashing the pieces already escaped. Without a C compiler at install time,
    or if it ever disagrees with the stdlib on the probe, the stdlib escaper is used.
    """
    return native_function("escape_ascii", _escaper_agrees) or _stdlib_escape_range


_escape_range: Final = _range_escaper()


class Serializer(Protocol):
    """Turns values into text and back.

    ``dumps`` raises :class:`~acall.errors.SerializationError` for a value it cannot
    encode; ``loads`` raises :class:`~acall.errors.DeserializationError` for text it
    cannot decode.
    """

    #: Short name recorded next to stored data, e.g. ``"json"``.
    name: ClassVar[str]

    def dumps(self, obj: Any) -> str:
        """Encode *obj* as text."""
        ...

    def loads(self, text: str) -> Any:
        """Decode text produced by :meth:`dumps`."""
        ...


@runtime_checkable
class JsonSerializable(Protocol):
    """Values that encode themselves: ``to_json()`` and a classmethod ``from_json()``.

    Instances are written as ``{"__pynenc__json_serializable__": {"module", "qualname",
    "data"}}`` and rebuilt with ``cls.from_json(data)``.
    """

    def to_json(self) -> Any:
        """Return a JSON-encodable representation of this value."""
        ...

    @classmethod
    def from_json(cls, data: Any) -> Any:
        """Rebuild a value from what :meth:`to_json` returned."""
        ...


def describe_value(value: Any) -> str:
    """Return ``module.Type`` and a truncated repr of *value*, for error messages."""
    cls = type(value)
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<repr failed: {type(exc).__name__}>"
    if len(text) > _REPR_LIMIT:
        text = text[:_REPR_LIMIT] + "..."
    return f"{_type_name(cls)} (value: {text})"


def _type_name(cls: type) -> str:
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# --------------------------------------------------------------------------- encoding


def _reusable_c_encoder(encoder: json.JSONEncoder) -> Callable[[Any, int], Any] | None:
    """The C encoder JSONEncoder.encode builds on every call, built once.

    Built without a markers dict (no circular-reference bookkeeping), so it keeps no
    state between calls and threads may share it; a cycle then ends in RecursionError,
    which dumps reports as a SerializationError like any other. ``None`` where the C
    accelerator is missing or does not write what JSONEncoder writes.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        c_encode: Callable[[Any, int], Any] = make(
            None,
            encoder.default,
            encode_basestring_ascii,
            None,
            encoder.key_separator,
            encoder.item_separator,
            False,
            False,
            True,
        )
        probe = {"a": [1, 2.5, None, True, "é"], "b": (float("nan"),), 3: {}}
        if "".join(c_encode(probe, 0)) != encoder.encode(probe):
            return None
    except Exception:
        return None
    return c_encode


# What ujson writes differently from json.dumps, found by differential tests (every code
# point, millions of floats, every key type; kept as tests): DEL unescaped, floats in
# [1e-9, 1e-4) with a one-digit exponent ("1e-5" for "1e-05"), and NaN / infinite float
# keys as "nan" / "inf". The first is mended (a raw DEL can only come from string
# content); the others send the value back to the exact encoder.
_ONE_DIGIT_EXPONENT: Final = re.compile(r"e-[0-9](?![0-9])")
_FAST_PROBE: Final = {
    "text": 'é\x7f\x00"\\/😀\ud800\u2028',
    "numbers": (1, -(2**70), 0.5, -0.0, 1e16, 1.25e-10, 1.5e300, float("nan"), float("inf")),
    "nested": [[{}], [], {"1e-05": None}],
    1: True,
    2.5: True,
    None: None,
    False: [],
}
# marshal writes a float as this type code (or it with the reference flag, 0x80) and the
# 8 bytes of the double, little-endian.
_FLOAT_CODES: Final = (ord("g"), ord("g") | 0x80)
# Past this many candidate bytes, _may_hold_nonfinite stops looking and says "maybe".
_NONFINITE_SCAN_LIMIT: Final = 16384


def _may_hold_nonfinite(marshalled: bytes) -> bool:
    """Whether ``marshal`` output may hold a NaN or infinite float; never False if it does.

    Such a double ends (little-endian) in a byte 0x7f or 0xff after a byte 0xf0 or above
    (all exponent bits set). Bytes 0x7f / 0xff are rare in marshal output, and ``find``
    looks for them at memchr speed; each one found is checked for a float type code 8
    bytes earlier. Far cheaper than searching the JSON text for a ``"nan": `` key.
    """
    seen = 0
    for last in (0x7F, 0xFF):
        at = marshalled.find(last, 8)
        while at != -1:
            if marshalled[at - 1] >= 0xF0 and marshalled[at - 8] in _FLOAT_CODES:
                return True
            seen += 1
            if seen > _NONFINITE_SCAN_LIMIT:
                return True
            at = marshalled.find(last, at + 1)
    return False


#: What :data:`_plain` returns for a value not made only of exact builtin types.
NOT_PLAIN: Final = -1
#: Flag of :data:`_plain`: a dict key may be a NaN or infinite float.
NONFINITE_KEY: Final = 1


def _plain_by_marshal(obj: Any) -> int:
    """:data:`_plain` where the native walker is missing: ``marshal`` accepts exact
    ``dict``/``list``/``tuple``/``str``/``int``/``float``/... and refuses subclasses and
    any other object, in C; a value it accepts holds no enum member. Its output shows
    NaN and infinite floats (see :func:`_may_hold_nonfinite`)."""
    try:
        marshalled = marshal.dumps(obj)
    except (ValueError, TypeError, RecursionError):
        return NOT_PLAIN
    return NONFINITE_KEY if _may_hold_nonfinite(marshalled) else 0


class _ProbeEnum(Enum):
    MEMBER = 1


def _walker_agrees(plain_tree: Callable[[Any], int]) -> bool:
    """Whether the native *plain_tree* tells a plain tree and its flags, on probes."""
    probe_plain = {"a": [1, 2.5, (None, True)], 3: {float("inf"): ""}}
    probe_not = [1, {"a": _ProbeEnum.MEMBER}]
    return plain_tree(probe_plain) == NONFINITE_KEY and plain_tree(probe_not) == NOT_PLAIN


def _plain_checker() -> Callable[[Any], int]:
    """``_plain(obj)``: :data:`NOT_PLAIN` unless *obj* is built only of exact ``dict``,
    ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool`` and ``None``; else flags
    (:data:`NONFINITE_KEY`).

    The native walker (``acall._speedups.plain_tree``) reads the tree without writing
    anything, about four times as fast as ``marshal``, and says exactly whether a key
    is a NaN or infinite float.
    """
    return native_function("plain_tree", _walker_agrees) or _plain_by_marshal


_plain: Final = _plain_checker()


def _fast_encoder() -> Callable[[Any, int], str | None] | None:
    """ujson's encoder, made to write exactly what json.dumps writes, or ``None``.

    The returned function takes the value and the flags :data:`_plain` found in it: it
    is made of exact builtin types only (no enum member, no subclass with its own idea
    of how it encodes), and ``NONFINITE_KEY`` says whether a dict key may be a NaN or
    infinite float. It gives ``None`` where it cannot promise json.dumps's bytes; the
    exact encoder then decides, errors included. ``None`` where ujson is missing or its
    output differs on a probe (a version that changed what it writes).

    Where the native walker is missing, :data:`_plain` asks ``marshal``, which also
    accepts any object with the buffer protocol: a subclass of ``bytes``, ``bytearray``
    or ``array.array`` that defines ujson's ``toDict()`` or ``__json__()`` hook is then
    written through that hook, where json.dumps (and so pynenc) would refuse it.
    """
    try:
        import ujson
    except ImportError:  # pragma: no cover - a dependency; the exact encoder remains
        return None
    dumps = ujson.dumps
    separators = (", ", ": ")

    def encode(obj: Any, flags: int) -> str | None:
        try:
            text: str = dumps(
                obj, ensure_ascii=True, escape_forward_slashes=False, separators=separators
            )
        except Exception:  # bytes, sets, cycles, depth: json.dumps decides and reports
            return None
        # Single-character tests first: they run at memchr speed, substring searches
        # about 50 times slower.
        if "-" in text and "e-" in text and _ONE_DIGIT_EXPONENT.search(text) is not None:
            return None
        if flags & NONFINITE_KEY and ('nan": ' in text or 'inf": ' in text):
            return None
        if "\x7f" in text:
            text = text.replace("\x7f", "\\u007f")
        return text

    try:
        if encode(_FAST_PROBE, NONFINITE_KEY) != json.dumps(_FAST_PROBE):
            return None
    except Exception:  # pragma: no cover - a broken build of ujson
        return None
    return encode


_FAST_ENCODE: Final = _fast_encoder()


def _float_text(value: float) -> str:
    """A float as json.dumps writes it (allow_nan: NaN and Infinity, as pynenc does)."""
    if value != value:
        return "NaN"
    if value == _INF:
        return "Infinity"
    if value == -_INF:
        return "-Infinity"
    return float.__repr__(value)


_INF: Final = float("inf")


def _enum_envelope(obj: Enum) -> dict[str, Any]:
    cls = type(obj)
    if isinstance(obj, Flag) and not _within_flag(cls, obj.value):  # type: ignore[arg-type]
        # Refused here, where the caller can still do something about it, rather than
        # by loads() on the worker (see _within_flag).
        raise ValueError(
            f"{obj!r} has bits outside those of {cls.__qualname__}'s members, and only "
            "combinations of a Flag's members' bits can be loaded back"
        )
    return {ENUM_KEY: {"module": cls.__module__, "qualname": cls.__qualname__, "value": obj.value}}


def _default(obj: Any) -> Any:
    """Encode what the C encoder does not know natively (the pynenc envelope rules)."""
    if isinstance(obj, Enum):
        return _enum_envelope(obj)
    if isinstance(obj, Exception):
        cls = type(obj)
        if cls.__module__ == "builtins":
            return {ERROR_KEY: {"type": cls.__name__, "args": obj.args, "message": str(obj)}}
        return {
            EXCEPTION_KEY: {
                "module": cls.__module__,
                "qualname": cls.__qualname__,
                "args": obj.args,
                "message": str(obj),
            }
        }
    if isinstance(obj, JsonSerializable):
        js_cls = type(obj)
        return {
            JSON_SERIALIZABLE_KEY: {
                "module": js_cls.__module__,
                "qualname": js_cls.__qualname__,
                "data": obj.to_json(),
            }
        }
    raise SerializationError(
        f"cannot JSON-serialize {describe_value(obj)}: implement to_json()/from_json() "
        "(the JsonSerializable protocol), annotate the task parameter with the type so "
        "acall can unstructure it, or use the opt-in PickleSerializer",
        type_name=_type_name(type(obj)),
    )


# Types the C encoder writes without calling ``default`` and without recursion.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


# Each C-level pass below touches at most this many items, so a thread running the scan
# returns to the interpreter (and can hand over the GIL) every few milliseconds.
_SCAN_SLICE: Final = 32768
# Deeper than this, the scan gives up and lets the exact pre-pass decide; only a cycle
# (which the pre-pass reports as an error) or absurd nesting gets there.
_SCAN_DEPTH: Final = 200


def _needs_enum_pass(obj: Any) -> bool:
    """Return whether *obj* may hold an enum member the C encoder would write natively.

    pynenc wraps every ``Enum`` member reachable through dicts, lists and tuples in an
    envelope, including ``IntEnum``/``StrEnum`` members that the C encoder would otherwise
    write as plain numbers or strings. Finding out needs a walk, but not a Python-level
    one: the tree is scanned in slices with ``map``/``compress``/``chain`` (C loops), so
    the cost is a small fraction of encoding.
    """
    pending: list[tuple[int, list[Any]]] = [(0, [obj])]
    while pending:
        depth, part = pending.pop()
        all_types = set(map(type, part))
        types = all_types - _SCALARS
        if not types:
            continue
        if depth > _SCAN_DEPTH:
            return True
        dict_types: set[type] = set()
        seq_types: set[type] = set()
        for t in types:
            if issubclass(t, Enum):
                return True
            if issubclass(t, dict):
                dict_types.add(t)
            elif issubclass(t, (list, tuple)):
                seq_types.add(t)
        if not dict_types and not seq_types:
            continue
        if all_types == dict_types:
            # The common case, a slice of dicts only: no filtering needed.
            children: Iterator[Any] = chain.from_iterable(map(dict.values, part))
        else:
            part_types = list(map(type, part))
            dicts = compress(part, map(dict_types.__contains__, part_types))
            seqs = compress(part, map(seq_types.__contains__, part_types))
            children = chain(
                chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(seqs)
            )
        while chunk := list(islice(children, _SCAN_SLICE)):
            pending.append((depth + 1, chunk))
    return False


def _enum_pass(obj: Any) -> Any:
    """Wrap every enum member reachable through dicts, lists and tuples (pynenc's pre-pass)."""
    if isinstance(obj, Enum):
        return _enum_envelope(obj)
    if isinstance(obj, dict):
        return {k: _enum_pass(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_enum_pass(item) for item in obj]
    return obj


def _encoding_error(obj: Any, exc: BaseException) -> SerializationError:
    """The SerializationError for the encoder's TypeError / ValueError / RecursionError."""
    if isinstance(exc, RecursionError):
        reason = "it is nested too deeply or contains itself"
    else:
        reason = str(exc)
    return SerializationError(
        f"cannot JSON-serialize {describe_value(obj)}: {reason}", type_name=_type_name(type(obj))
    )


class JsonSerializer:
    """pynenc-compatible JSON with safe loading; the default serializer.

    :param importable_modules: module name prefixes that :meth:`loads` may *import* to
        resolve an envelope's class. By default nothing is imported: classes are found
        only in modules the process has already imported, so no payload can trigger an
        import's side effects. Pass e.g. ``{"myapp"}`` to allow ``myapp`` and its
        submodules.
    """

    name: ClassVar[str] = "json"

    #: Target size of one piece of :meth:`iter_dumps` output; each piece is produced in
    #: one C call that holds the GIL, so this bounds how long other threads wait.
    chunk_chars: ClassVar[int] = 256 * 1024

    def __init__(self, *, importable_modules: Collection[str] = ()) -> None:
        self._importable = tuple(importable_modules)
        self._encoder = json.JSONEncoder(default=_default)
        self._c_encode = _reusable_c_encoder(self._encoder)

    def __repr__(self) -> str:
        return f"JsonSerializer(importable_modules={self._importable!r})"

    # -- encoding --------------------------------------------------------------------

    def dumps(self, obj: Any) -> str:
        """Encode *obj* exactly as pynenc's ``JsonSerializer.serialize`` does.

        :raises SerializationError: naming the type and a truncated repr of the value
            that cannot be encoded.
        """
        try:
            return self._encode(obj)
        except SerializationError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            raise _encoding_error(obj, exc) from exc

    def dumps_scalars(self, seq: list[Any] | tuple[Any, ...]) -> str:
        """:meth:`dumps` of a list or tuple whose items are exact ``int``, ``float``,
        ``bool`` or ``None`` (the caller has checked): with no enum member possible, the
        pre-pass check is skipped."""
        if self._c_encode is None:
            return self.dumps(seq)
        try:
            return "".join(self._c_encode(seq, 0))
        except (TypeError, ValueError) as exc:
            raise _encoding_error(seq, exc) from exc

    def iter_dumps(self, obj: Any) -> Iterator[str]:
        """Yield pieces whose concatenation equals :meth:`dumps` of *obj*.

        Used for large values encoded in a worker thread: the C encoder holds the GIL for
        a whole call, so encoding a 100 MB value in one call would freeze the event loop.
        Each piece here costs about :attr:`chunk_chars` characters of work.
        """
        try:
            yield from self._iter_encode(obj)
        except SerializationError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            raise _encoding_error(obj, exc) from exc

    #: Containers with fewer items than this go to the stdlib's C encoder, whose fixed
    #: cost per call is lower; larger ones to ujson's (about twice as fast per item).
    fast_min_items: ClassVar[int] = 32

    # Containers this small are walked item by item: the per-item overhead is nothing and
    # a single huge item (a 100 MB string under one key) still gets split.
    _FEW: ClassVar[int] = 64

    def _encode(self, obj: Any) -> str:
        """One C-encoder call, after pynenc's enum pre-pass where it changes anything."""
        kind = type(obj)
        # Exact scalar types take a shortcut: JSONEncoder.encode builds a C encoder per
        # call for anything but a str, which costs more than the encoding itself.
        if kind is str:
            return str(encode_basestring_ascii(obj))
        if kind is int:
            return int.__repr__(obj)
        if obj is None:
            return "null"
        if kind is bool:
            return "true" if obj else "false"
        if kind is float:
            return _float_text(obj)
        if (flags := _plain(obj)) != NOT_PLAIN:
            fast = _FAST_ENCODE
            if (
                fast is not None
                and (kind is list or kind is dict or kind is tuple)
                and len(obj) >= self.fast_min_items
                and (text := fast(obj, flags)) is not None
            ):
                return text
        elif _needs_enum_pass(obj):
            obj = _enum_pass(obj)
        if self._c_encode is not None:
            return "".join(self._c_encode(obj, 0))
        return str(self._encoder.encode(obj))

    def _iter_encode(self, obj: Any) -> Iterator[str]:
        # Enum members are wrapped per piece (the pre-pass commutes with slicing), so no
        # pass over the whole value ever holds the GIL at once.
        encode = self._encode
        target = self.chunk_chars
        if isinstance(obj, str):
            if len(obj) <= target or isinstance(obj, Enum):
                yield encode(obj)
                return
            # Slicing a str never splits a code point, and escaping is per character,
            # so the escaped slices concatenate to the escaped whole.
            yield '"'
            escape = _escape_range
            for start in range(0, len(obj), target):
                yield escape(obj, start, min(start + target, len(obj)))
            yield '"'
        elif isinstance(obj, (list, tuple)):
            if not obj:
                yield "[]"
                return
            yield "["
            if len(obj) <= self._FEW:
                for i, item in enumerate(obj):
                    if i:
                        yield ", "
                    yield from self._iter_encode(item)
            else:
                yield from self._iter_batches(len(obj), lambda a, b: encode(obj[a:b]))
            yield "]"
        elif isinstance(obj, dict):
            if not obj:
                yield "{}"
                return
            yield "{"
            if len(obj) <= self._FEW:
                for i, (key, value) in enumerate(obj.items()):
                    if i:
                        yield ", "
                    # Encode the key through the C encoder too, so non-str keys are
                    # converted exactly as json.dumps converts them.
                    yield encode({key: None})[1:-7]
                    yield ": "
                    yield from self._iter_encode(value)
            else:
                items = list(obj.items())
                yield from self._iter_batches(
                    len(items), lambda a, b: encode(dict(islice(items, a, b)))
                )
            yield "}"
        else:
            yield encode(obj)

    def _iter_batches(self, total: int, encode_slice: Callable[[int, int], str]) -> Iterator[str]:
        """Encode ``seq`` in slices sized so each piece is about :attr:`chunk_chars`."""
        target = self.chunk_chars
        step = 16
        start = 0
        while start < total:
            end = min(total, start + step)
            piece = encode_slice(start, end)[1:-1]  # drop the slice's own brackets
            if start:
                yield ", "
            yield piece
            # Adapt the batch to the observed size per item, within a factor of 4 per step.
            per_item = max(1, len(piece) // (end - start))
            step = max(1, min(step * 4, target // per_item))
            start = end

    # -- decoding --------------------------------------------------------------------

    def loads(self, text: str) -> Any:
        """Decode text, rebuilding envelopes only after checking what they name.

        :raises DeserializationError: for text that is not JSON or an envelope that
            cannot be rebuilt; :class:`~acall.errors.UnsafePayloadError` when an envelope
            names an object of the wrong kind.
        """
        if not isinstance(text, str):
            raise DeserializationError(
                f"JsonSerializer.loads expects str, got {type(text).__name__}"
            )
        if len(text) <= _SHORT:
            # Small scalars are most arguments; json.loads costs several times more than
            # recognising them. Anything not matched exactly falls through to json.loads.
            if text in _LITERALS:
                return _LITERALS[text]
            if _SMALL_INT.fullmatch(text):
                return int(text)
            if text[:1] == '"' and text[-1:] == '"' and len(text) > 1:
                inner = text[1:-1]
                if inner.isprintable() and '"' not in inner and "\\" not in inner:
                    return inner
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DeserializationError(
                f"not valid JSON ({exc}); text (truncated): {text[:_REPR_LIMIT]!r}"
            ) from None
        # Envelopes are objects: a top-level string or number holds none, whatever its
        # text mentions, and scanning a long string for the marker costs a pass over it.
        if type(value) is str or _ENVELOPE_MARKER not in text:
            return value
        try:
            return self._rebuild(value)
        except RecursionError:
            # json.loads reads nesting up to about the recursion limit; rebuilding it (or
            # repr() of a nested field in an error message) needs deeper recursion.
            raise DeserializationError(
                "JSON text holding envelopes is nested too deeply to rebuild; text "
                f"(truncated): {text[:_REPR_LIMIT]!r}"
            ) from None

    def _rebuild(self, data: Any) -> Any:
        if isinstance(data, dict):
            # Checked in pynenc's order, with its truthiness test, so any document pynenc
            # decodes is decoded the same way here (or refused).
            if spec := data.get(ERROR_KEY):
                return self._builtin_exception(spec)
            if spec := data.get(EXCEPTION_KEY):
                return self._client_exception(spec)
            if spec := data.get(JSON_SERIALIZABLE_KEY):
                return self._json_serializable(spec)
            if spec := data.get(ENUM_KEY):
                return self._enum(spec)
            return {k: self._rebuild(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self._rebuild(item) for item in data]
        return data

    def _builtin_exception(self, spec: Any) -> BaseException:
        type_name = _field(spec, ERROR_KEY, "type", str)
        args = _field(spec, ERROR_KEY, "args", list)
        found = vars(builtins).get(type_name)
        if found is None:
            message = spec.get("message", args)
            return RuntimeError(f"{type_name}: {message}")
        if not (_is_class(found) and issubclass(found, Exception)):
            raise UnsafePayloadError(
                f"refusing {ERROR_KEY} envelope: builtins.{type_name} is "
                f"{_kind(found)}, not an Exception class"
            )
        return _instantiate_exception(found, args, type_name)

    def _client_exception(self, spec: Any) -> BaseException:
        module = _field(spec, EXCEPTION_KEY, "module", str)
        qualname = _field(spec, EXCEPTION_KEY, "qualname", str)
        args = _field(spec, EXCEPTION_KEY, "args", list)
        message = spec.get("message", "")
        try:
            found = self._resolve(module, qualname)
        except LookupError:
            # The class is not available here: keep the information, lose the type.
            return RemoteTaskError(f"{module}.{qualname}", str(message))
        if not (_is_class(found) and issubclass(found, Exception)):
            # Exception only, as the encoder writes: a payload must never make a client
            # raise SystemExit, KeyboardInterrupt or GeneratorExit.
            raise UnsafePayloadError(
                f"refusing {EXCEPTION_KEY} envelope: {module}.{qualname} is "
                f"{_kind(found)}, not an Exception class"
            )
        return _instantiate_exception(found, args, f"{module}.{qualname}")

    def _json_serializable(self, spec: Any) -> Any:
        module = _field(spec, JSON_SERIALIZABLE_KEY, "module", str)
        qualname = _field(spec, JSON_SERIALIZABLE_KEY, "qualname", str)
        if "data" not in spec:
            raise DeserializationError(f"{JSON_SERIALIZABLE_KEY} envelope has no 'data' field")
        found = self._resolve_or_raise(module, qualname, JSON_SERIALIZABLE_KEY)
        if not (_is_class(found) and _implements_json_serializable(found)):
            raise UnsafePayloadError(
                f"refusing {JSON_SERIALIZABLE_KEY} envelope: {module}.{qualname} is "
                f"{_kind(found)}, not a class defining to_json() and from_json()"
            )
        try:
            return found.from_json(spec["data"])  # type: ignore[attr-defined]
        except Exception as exc:
            raise DeserializationError(
                f"{module}.{qualname}.from_json() failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _enum(self, spec: Any) -> Enum:
        module = _field(spec, ENUM_KEY, "module", str)
        qualname = _field(spec, ENUM_KEY, "qualname", str)
        if "value" not in spec:
            raise DeserializationError(f"{ENUM_KEY} envelope has no 'value' field")
        found = self._resolve_or_raise(module, qualname, ENUM_KEY)
        if not (_is_class(found) and issubclass(found, Enum)):
            raise UnsafePayloadError(
                f"refusing {ENUM_KEY} envelope: {module}.{qualname} is {_kind(found)}, "
                "not an Enum class"
            )
        value = spec["value"]
        if issubclass(found, Flag) and not _within_flag(found, value):
            raise DeserializationError(
                f"{reprlib.repr(value)} is not a member of {module}.{qualname}: only "
                "combinations of its members' bits are loaded"
            )
        try:
            return found(value)
        except Exception as exc:
            # Not only ValueError: an enum's _missing_ hook may raise anything, and
            # Enum.__new__ passes a non-ValueError from it through.
            raise DeserializationError(
                f"{reprlib.repr(value)} is not a member of {module}.{qualname}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _resolve_or_raise(self, module: str, qualname: str, envelope: str) -> Any:
        try:
            return self._resolve(module, qualname)
        except LookupError as exc:
            raise DeserializationError(f"cannot rebuild {envelope} envelope: {exc}") from None

    def _resolve(self, module_name: str, qualname: str) -> Any:
        """Find ``module.qualname`` without running code the payload could choose.

        The module must already be imported (or match ``importable_modules``). The first
        qualname part is read from the module's own dict, the next ones from the dicts
        of the classes found (a qualname names nested classes), each through the
        descriptors of ``ModuleType`` and ``type`` themselves: no property, descriptor,
        module or metaclass ``__getattr__``/``__getattribute__`` runs, and a lazily
        loaded module is not loaded.

        :raises LookupError: when the module or an attribute is not there.
        """
        module = sys.modules.get(module_name)
        if module is None:
            if not any(
                module_name == p or module_name.startswith(p + ".") for p in self._importable
            ):
                raise LookupError(
                    f"module {module_name!r} is not imported in this process (acall never "
                    "imports a module named by data; import it first or list it in "
                    "JsonSerializer(importable_modules=...))"
                )
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # an allowed module may fail with anything on import
                raise LookupError(
                    f"module {module_name!r} cannot be imported: {type(exc).__name__}: {exc}"
                ) from None
        if not issubclass(type(module), types.ModuleType):
            raise LookupError(
                f"sys.modules[{module_name!r}] is a {_CLASS_QUALNAME.__get__(type(module))}, "
                "not a module"
            )
        found: Any = module
        namespace: Mapping[str, Any] = _MODULE_DICT.__get__(module)
        for part in qualname.split("."):
            if part not in namespace:
                raise LookupError(f"{module_name}.{qualname} does not exist")
            found = namespace[part]
            # Deeper parts are looked up in classes only: never through a module held
            # as an attribute, nor an instance (whose __dict__ may be a property).
            namespace = _CLASS_DICT.__get__(found) if _is_class(found) else {}
        return found


def _field(spec: Any, envelope: str, name: str, kind: type) -> Any:
    if not isinstance(spec, dict):
        raise DeserializationError(
            f"{envelope} envelope must hold an object, got {reprlib.repr(spec)}"
        )
    value = spec.get(name)
    if not isinstance(value, kind):
        raise DeserializationError(
            f"{envelope} envelope field {name!r} must be {kind.__name__}, got {reprlib.repr(value)}"
        )
    return value


# The descriptors behind ``module.__dict__``, ``cls.__dict__``, ``cls.__mro__`` and
# ``cls.__qualname__``, called directly: an attribute lookup would go through the
# object's type, whose __getattribute__ (a lazy module's, a metaclass's) runs code.
_MODULE_DICT: Final = vars(types.ModuleType)["__dict__"]
_CLASS_DICT: Final = vars(type)["__dict__"]
_CLASS_MRO: Final = vars(type)["__mro__"]
_CLASS_QUALNAME: Final = vars(type)["__qualname__"]


def _is_class(obj: Any) -> TypeGuard[type]:
    # Not isinstance(obj, type): for a non-class it falls back to obj.__class__, which
    # an object may define as a property, and a lying one passes the check.
    return issubclass(type(obj), type)


def _kind(obj: Any) -> str:
    if _is_class(obj):
        module = _CLASS_DICT.__get__(obj).get("__module__")
        qualname = _CLASS_QUALNAME.__get__(obj)
        return f"the class {qualname if module == 'builtins' else f'{module}.{qualname}'}"
    return f"a {_CLASS_QUALNAME.__get__(type(obj))}"


def _implements_json_serializable(cls: type) -> bool:
    # Looked up through the MRO dicts, not getattr, so no metaclass code runs.
    def defined(name: str) -> bool:
        return any(name in _CLASS_DICT.__get__(base) for base in _CLASS_MRO.__get__(cls))

    return defined("to_json") and defined("from_json")


def _within_flag(cls: type[Flag], value: Any) -> bool:
    """Whether *value* only combines bits of *cls*'s members.

    A Flag class creates and caches a pseudo-member for each new combination it is
    called with, and with the KEEP boundary (IntFlag's) for any integer at all: a
    stream of distinct out-of-range values would grow memory without bound.
    """
    namespace = _CLASS_DICT.__get__(cls)
    mask = namespace.get("_flag_mask_")
    members = namespace.get("_member_map_")
    if not isinstance(mask, int) or not isinstance(members, dict):  # pragma: no cover
        return True  # (every Flag has both on 3.11+)
    if mask < 0:
        # A negative member (an alias such as ALL = -1) sets every bit of the class's
        # mask: only the bits of the other members count.
        mask = 0
        for member in members.values():
            if member._value_ >= 0:
                mask |= member._value_
    if isinstance(value, int) and value >= 0 and not value & ~mask:
        return True
    # A member defined with a negative value is found as it is.
    return type(value) is int and any(member._value_ == value for member in members.values())


def _instantiate_exception(cls: type[BaseException], args: list[Any], name: str) -> BaseException:
    try:
        return cls(*args)
    except Exception as exc:
        raise DeserializationError(
            f"cannot rebuild exception {name} from args {reprlib.repr(args)}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


class PickleSerializer:
    """Pickle, base64-encoded (the same text as pynenc's ``PickleSerializer``).

    .. warning::
       **Unsafe for untrusted data.** Loading a pickle can run any code. Use this only
       when every process that can write to your broker and store is trusted.
    """

    name: ClassVar[str] = "pickle"

    def dumps(self, obj: Any) -> str:
        """Pickle *obj* and base64-encode it (MIME line breaks, as pynenc writes)."""
        try:
            return base64.encodebytes(pickle.dumps(obj)).decode("ascii")
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle {describe_value(obj)}: {exc}", type_name=_type_name(type(obj))
            ) from exc

    def loads(self, text: str) -> Any:
        """Decode and unpickle. Runs code named by the data: trusted input only."""
        try:
            return pickle.loads(base64.decodebytes(text.encode("ascii")))
        except Exception as exc:
            raise DeserializationError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc
