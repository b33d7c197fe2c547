"""Fuzzing the DTO decoder: CallDTO / InvocationRecord / ErrorInfo documents.

Property: any document either decodes to a record that encodes back to the same record
(as JSON text that is valid UTF-8 and standard JSON), or raises DTOValidationError
naming the bad field; no KeyError, TypeError, UnicodeError or RecursionError leaks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from fuzz_support import (
    FUZZ_MARKS,
    assert_useful_error,
    corpus_files,
    count,
    fuzz_settings,
    fuzz_summary,  # noqa: F401 - the module's summary fixture
    json_values,
    nasty_text,
    timed,
)
from hypothesis import example, given
from hypothesis import strategies as st

from acall import (
    CallDTO,
    CallId,
    DTOCodec,
    DTOValidationError,
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
    TaskId,
    compute_args_id,
)
from acall.dto import RECORD_VERSION

FUZZ_TARGETS = ["dto"]
pytestmark = FUZZ_MARKS

_CODECS = {True: DTOCodec(), False: DTOCodec(verify_args_id=False)}
_CLASSES: tuple[type[CallDTO] | type[InvocationRecord], ...] = (CallDTO, InvocationRecord)


def _check_decoded(obj: Any, cls: type[Any], codec: DTOCodec) -> None:
    """A decoded document is a valid value: it re-encodes and decodes to itself."""
    assert type(obj) is cls
    text = codec.to_json(obj)
    text.encode("utf-8")  # a record that cannot travel is not a valid value
    json.loads(text, parse_constant=_no_constants)  # standard JSON: no NaN / Infinity
    again = codec.from_json(text, cls)
    assert again == obj
    dto = obj.call if isinstance(obj, InvocationRecord) else obj
    if codec.verify_args_id:
        assert compute_args_id(dto.serialized_arguments) == dto.call_id.args_id


def _no_constants(token: str) -> Any:
    raise AssertionError(f"a decoded record re-encoded to non-standard JSON ({token})")


def decode(data: Any, *, verify: bool = True, blame: str | None = None) -> None:
    """Feed *data* (text, bytes or a parsed document) to both decoders; check the property.

    :param blame: the field path a mutation touched; a failure must name it (or a field
        above or below it).
    """
    codec = _CODECS[verify]
    for cls in _CLASSES:
        count("dto")
        read: Callable[[Any, type[Any]], Any] = (
            codec.from_json if isinstance(data, str | bytes) else codec.from_dict
        )
        try:
            obj = timed(lambda: read(data, cls))  # noqa: B023 - called before the next turn
        except DTOValidationError as exc:
            _check_error(exc, cls, blame if cls is InvocationRecord else None)
        except Exception as exc:
            raise AssertionError(
                f"{cls.__name__} decoder leaked {type(exc).__name__}: {exc!r:.300}"
            ) from exc
        else:
            _check_decoded(obj, cls, codec)


def _check_error(exc: DTOValidationError, cls: type[Any], blame: str | None) -> None:
    assert_useful_error(exc, DTOValidationError, f"invalid {cls.__name__}")
    assert exc.errors, "a DTOValidationError without field errors"
    for path, problem in exc.errors:
        assert isinstance(path, str)
        assert problem.strip(), f"empty problem for field {path!r}"
    if blame is not None:
        _assert_blamed(exc, blame)


def _assert_blamed(exc: DTOValidationError, path: str) -> None:
    paths = [p for p, _ in exc.errors]
    if paths == [""] and "not valid JSON" in exc.errors[0][1]:
        return  # json.dumps wrote nesting deeper than json.loads reads back
    related = [
        p for p in paths if p == path or p.startswith(path + ".") or path.startswith(p + ".")
    ]
    # Changing the arguments changes their args_id: the call_id is what disagrees.
    if path.startswith("call.serialized_arguments"):
        related += [p for p in paths if p == "call.call_id"]
    assert related, f"mutating {path!r} was blamed on {paths}"


# ------------------------------------------------------------------ valid documents

_ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
_args = st.dictionaries(
    st.text(max_size=8),
    st.text(max_size=30) | st.from_regex(r"__pynenc__client_data__:[0-9a-f]{64}", fullmatch=True),
    max_size=4,
)
_finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@st.composite
def call_dtos(draw: st.DrawFn) -> CallDTO:
    module = ".".join(draw(st.lists(_ident, min_size=1, max_size=3)))
    args = draw(_args)
    return CallDTO(CallId(TaskId(module, draw(_ident)), compute_args_id(args)), args)


@st.composite
def records(draw: st.DrawFn) -> InvocationRecord:
    optional_text = st.none() | st.text(max_size=20)
    error = draw(
        st.none() | st.builds(ErrorInfo, st.text(max_size=20), st.text(max_size=20), optional_text)
    )
    return InvocationRecord(
        invocation_id=draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
        call=draw(call_dtos()),
        queue=draw(st.sampled_from(["default", "q1", "high.prio"])),
        status=draw(st.sampled_from(list(InvocationStatus))),
        attempt=draw(st.integers(0, 50)),
        max_retries=draw(st.integers(0, 50)),
        created_at=draw(_finite),
        updated_at=draw(_finite),
        not_before=draw(st.none() | _finite),
        timeout=draw(st.none() | _finite),
        worker_id=draw(optional_text),
        dedup_key=draw(optional_text),
        error=error,
        result=draw(optional_text),
    )


@given(records())
@fuzz_settings(0.5)
def test_valid_records_round_trip(record: InvocationRecord) -> None:
    codec = DTOCodec()
    count("dto")
    assert codec.from_json(codec.to_json(record), InvocationRecord) == record
    decode(codec.to_json(record))


# ------------------------------------------------------------- structural mutations

# Values that are wrong for some field: wrong types, non-finite numbers, huge integers,
# lone surrogates, deep nesting, near-miss keys.
_wrong = st.one_of(
    json_values,
    st.sampled_from(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            -1,
            2**64,
            10**4000,
            True,
            "\ud800",
            "m.f:\ud800",
            "m.\udfff:no_args",
            "m.f:" + "0" * 64,
            "m.f:NO_ARGS",
            ":no_args",
            "pending ",
            "PENDING",
            [[[[[[[[[[[[]]]]]]]]]]]],
            {"type_name": "X", "message": "\ud800"},
            {"call_id": "m.f:no_args", "serialized_arguments": {}},
            {"x": "\ud800"},
        ]
    ),
    st.integers(1, 3000).map(lambda n: _deep(n)),
)


def _deep(n: int) -> Any:
    value: Any = []
    for _ in range(n):
        value = [value] if n % 2 else {"a": value}
    return value


def _paths(doc: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Field paths of a record document (three levels: record, call / error, arguments)."""
    out = []
    if isinstance(doc, dict) and depth < 3:
        for key, value in doc.items():
            if not isinstance(key, str) or "." in key:
                continue
            path = f"{prefix}{key}"
            out.append(path)
            out.extend(_paths(value, path + ".", depth + 1))
    return out


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid record document with one to three fields deleted, replaced or added."""
    doc = DTOCodec().to_dict(draw(records()))
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            _set(doc, path, _DELETE)
        elif action == "add":
            parent = path.rpartition(".")[0]
            name = draw(nasty_text.filter(lambda s: "." not in s))
            path = (parent + "." if parent else "") + name
            _set(doc, path, draw(_wrong))
        else:
            _set(doc, path, draw(_wrong))
        touched.append(path)
    return doc, touched


@given(mutated_documents(), st.booleans())
@fuzz_settings(1.0)
def test_mutated_documents(mutation: tuple[dict[str, Any], list[str]], verify: bool) -> None:
    doc, touched = mutation
    blame = touched[0] if len(touched) == 1 else None
    decode(doc, verify=verify, blame=blame)
    # The same document as JSON text (NaN / Infinity tokens included, as json writes them).
    try:
        text = json.dumps(doc, ensure_ascii=bool(len(touched) % 2))
    except (ValueError, RecursionError):
        return  # too deep or an int too long for str(): json cannot write it
    decode(text, verify=verify, blame=blame)


_MINIMAL = InvocationRecord("0" * 32, CallDTO(CallId(TaskId("m", "f"), "no_args")))


@given(st.sampled_from(["v", "attempt", "max_retries"]), st.integers() | st.floats())
@fuzz_settings(0.3)
def test_numbers_in_integer_fields(field: str, value: int | float) -> None:
    doc = DTOCodec().to_dict(_MINIMAL)
    doc[field] = value
    decode(doc, blame=field)


@given(
    st.sampled_from(["created_at", "updated_at", "not_before", "timeout"]),
    st.floats() | st.integers(),
)
@fuzz_settings(0.3)
def test_numbers_in_float_fields(field: str, value: int | float) -> None:
    doc = DTOCodec().to_dict(_MINIMAL)
    doc[field] = value
    decode(doc, blame=field)


# ------------------------------------------------------------------ text mutations


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    """The JSON bytes of a valid document, then bit flips, cuts, splices, duplicates."""
    codec = DTOCodec()
    data = bytearray(codec.to_json(draw(records() | call_dtos())).encode("utf-8"))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "splice", "insert", "dupkey", "replace"]))
        if not data:
            data = bytearray(b"{")
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "splice":
            other = codec.to_json(draw(records())).encode("utf-8")
            data[pos:] = other[draw(st.integers(0, len(other) - 1)) :]
        elif op == "insert":
            data[pos:pos] = draw(
                st.sampled_from(
                    [b'"', b"\\", b"\\ud800", b"\xff", b"\xed\xa0\x80", b"NaN", b"1e999", b"[" * 50]
                )
                | st.binary(max_size=8)
            )
        elif op == "dupkey":
            # A second copy of a key right after the opening brace: json keeps the last.
            key = draw(st.sampled_from([b'"v":99,', b'"call":1,', b'"status":"x",']))
            data[1:1] = key
        else:
            old = draw(st.sampled_from([b"pending", b"default", b"no_args", b":", b"."]))
            new = draw(st.sampled_from([b"", b"\\u0000", b"PENDING", b"::", b".."]))
            data = bytearray(bytes(data).replace(old, new, 1))
    return bytes(data)


@given(mutated_texts())
@fuzz_settings(1.0)
@example(b'{"v": 1, "call": ' + b"[" * 5000 + b"]" * 5000 + b"}")
@example(b"\xef\xbb\xbf{}")
def test_mutated_json_texts(data: bytes) -> None:
    decode(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    decode(text)


@given(st.binary(max_size=200) | st.text(max_size=200))
@fuzz_settings(0.3)
def test_random_input(data: bytes | str) -> None:
    decode(data)


@given(json_values)
@fuzz_settings(0.3)
def test_any_json_value(doc: Any) -> None:
    decode(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"v": _deep(2999), "call": {}},  # repr() of v in the message recursed too deep
        {"v": _deep(3000), "call": {}},
        {"v": 1, "created_at": 10**400, "call": {"call_id": "m.f:no_args"}},
        {**DTOCodec().to_dict(_MINIMAL), "timeout": -(10**400)},
    ],
    ids=["deep-v-list", "deep-v-dict", "huge-int-timestamp", "huge-int-timeout"],
)
def test_documents_found_by_fuzzing(doc: Any) -> None:
    decode(doc)


# ---------------------------------------------------------------------------- corpus


def test_corpus_is_not_empty() -> None:
    assert len(corpus_files("dto")) >= 10


@pytest.mark.parametrize("path", corpus_files("dto"), ids=lambda p: p.name)
def test_corpus(path: Any) -> None:
    data = path.read_bytes()
    decode(data)
    decode(data, verify=False)
    with contextlib.suppress(UnicodeDecodeError):
        decode(data.decode("utf-8"))


def test_error_info_fields_are_checked() -> None:
    """ErrorInfo is only ever decoded inside a record: each bad field is named."""
    base = DTOCodec().to_dict(
        InvocationRecord(
            "0" * 32,
            CallDTO(CallId(TaskId("m", "f"), "no_args")),
            error=ErrorInfo("ValueError", "bad", None, None),
        )
    )
    cases: list[tuple[str, Any]] = [
        ("type_name", None),
        ("message", 1),
        ("serialized", []),
        ("traceback", {"a": 1}),
        ("message", "\ud800"),
    ]
    for field, value in cases:
        doc = copy.deepcopy(base)
        doc["error"][field] = value
        with pytest.raises(DTOValidationError) as info:
            DTOCodec().from_dict(doc, InvocationRecord)
        assert f"error.{field}" in [p for p, _ in info.value.errors]


def test_non_finite_numbers_are_refused() -> None:
    record = InvocationRecord("0" * 32, CallDTO(CallId(TaskId("m", "f"), "no_args")))
    for field in ("created_at", "timeout", "not_before"):
        for value in (math.nan, math.inf, -math.inf):
            doc = DTOCodec().to_dict(attrs.evolve(record))
            doc[field] = value
            with pytest.raises(DTOValidationError, match=field):
                DTOCodec().from_dict(doc, InvocationRecord)
    assert RECORD_VERSION >= 1
