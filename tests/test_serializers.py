"""JsonSerializer: byte-identical to pynenc 0.4.0, safe to load; PickleSerializer opt-in."""

from __future__ import annotations

import codecs
import json
import math
import pickle
import sys
import types
from collections.abc import Iterator
from enum import Enum, IntFlag
from pathlib import Path
from typing import Any

import acall_serializer_cases as cases_mod
import pytest
from hypothesis import given
from hypothesis import strategies as st

from acall import (
    DeserializationError,
    JsonSerializer,
    PickleSerializer,
    RemoteTaskError,
    SerializationError,
    UnsafePayloadError,
)
from acall.hashing import REFERENCE_PREFIX, compute_args_id

VECTOR_DIR = Path(__file__).parent / "vectors"
RECORDED: dict[str, str] = json.loads(
    (VECTOR_DIR / "pynenc-json-serializer.json").read_text(encoding="utf-8")
)["cases"]
END_TO_END = json.loads((VECTOR_DIR / "pynenc-args-id.json").read_text(encoding="utf-8"))[
    "end_to_end_json"
]
CASES = cases_mod.cases()


@pytest.fixture
def ser() -> JsonSerializer:
    return JsonSerializer()


def test_every_case_was_recorded() -> None:
    assert set(CASES) == set(RECORDED)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dumps_is_byte_identical_to_pynenc(ser: JsonSerializer, name: str) -> None:
    assert ser.dumps(CASES[name]) == RECORDED[name]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_chars", [7, 1000, 256 * 1024])
def test_chunked_dumps_is_byte_identical(name: str, chunk_chars: int) -> None:
    ser = JsonSerializer()
    ser.chunk_chars = chunk_chars  # type: ignore[misc]
    assert "".join(ser.iter_dumps(CASES[name])) == RECORDED[name]


def test_chunked_dumps_yields_bounded_pieces() -> None:
    ser = JsonSerializer()
    value = CASES["dict_with_big_values"]
    pieces = list(ser.iter_dumps(value))
    assert len(pieces) > 4
    # Each piece is produced by one C call; none may be much larger than the target.
    assert max(map(len, pieces)) <= 4 * ser.chunk_chars


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, BaseException):
        return type(a) is type(b) and _same(list(a.args), list(b.args))
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        # JSON turns non-str keys into strings.
        return isinstance(b, dict) and all(_same(v, b[_json_key(k)]) for k, v in a.items())
    return bool(a == b) and (not isinstance(a, Enum) or a is b)


def _json_key(k: Any) -> str:
    return k if isinstance(k, str) else json.dumps(k).strip('"')


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(ser: JsonSerializer, name: str) -> None:
    value = CASES[name]
    assert _same(value, ser.loads(ser.dumps(value)))


def test_loads_of_recorded_pynenc_output(ser: JsonSerializer) -> None:
    assert ser.loads(RECORDED["int_enum"]) is cases_mod.Level.HIGH
    assert ser.loads(RECORDED["str_enum"]) is cases_mod.Mode.FAST
    exc = ser.loads(RECORDED["custom_error_subclass_builtin"])
    assert isinstance(exc, cases_mod.DetailedError)
    assert (exc.code, exc.detail) == (7, "detail")
    assert ser.loads(RECORDED["money"]) == cases_mod.Money(9.99, "EUR")


def test_unknown_builtin_exception_falls_back_like_pynenc(ser: JsonSerializer) -> None:
    text = json.dumps(
        {"__pynenc__std_py_exc__": {"type": "NoSuchError", "args": [], "message": "m"}}
    )
    exc = ser.loads(text)
    assert isinstance(exc, RuntimeError)
    assert str(exc) == "NoSuchError: m"


def test_exception_from_unimported_module_becomes_remote_task_error(ser: JsonSerializer) -> None:
    text = json.dumps(
        {
            "__pynenc__client_exception__": {
                "module": "acall_tests_not_a_module",
                "qualname": "Boom",
                "args": ["x"],
                "message": "x",
            }
        }
    )
    exc = ser.loads(text)
    assert isinstance(exc, RemoteTaskError)
    assert exc.type_name == "acall_tests_not_a_module.Boom"
    assert "acall_tests_not_a_module" not in sys.modules


@pytest.mark.parametrize(
    "value",
    [
        [{"a": 1, "b": [1.5, None, True]}] * 3,
        {"nested": {"deep": [[[]]]}},
        "plain",
        12,
    ],
)
def test_plain_json_matches_stdlib(ser: JsonSerializer, value: Any) -> None:
    assert ser.dumps(value) == json.dumps(value)


scalars = st.none() | st.booleans() | st.integers() | st.floats()


@given(st.lists(scalars, max_size=64) | st.lists(scalars, max_size=8).map(tuple))
def test_dumps_scalars_matches_dumps(value: list[Any] | tuple[Any, ...]) -> None:
    ser = JsonSerializer()
    assert ser.dumps_scalars(value) == ser.dumps(value) == json.dumps(value)


def test_dumps_scalars_reports_like_dumps() -> None:
    # Not what callers pass; still a SerializationError rather than a raw TypeError.
    with pytest.raises(SerializationError, match="object"):
        JsonSerializer().dumps_scalars([object()])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_property_json_values(value: Any) -> None:
    ser = JsonSerializer()
    text = ser.dumps(value)
    assert text == json.dumps(value)
    assert ser.loads(text) == value
    small = JsonSerializer()
    small.chunk_chars = 3  # type: ignore[misc]
    assert "".join(small.iter_dumps(value)) == text


# --------------------------------------------------------------------- errors on dumps


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(" + "x" * 500 + ")"


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Opaque(), "test_serializers.Opaque"),
        ({1, 2}, "set"),
        (b"bytes", "bytes"),
        ({"ok": [1, {"deep": Opaque()}]}, "test_serializers.Opaque"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_unserializable_value_names_type_and_truncated_repr(
    ser: JsonSerializer, value: Any, type_name: str
) -> None:
    for dump in (ser.dumps, lambda v: "".join(ser.iter_dumps(v))):
        with pytest.raises(SerializationError) as info:
            dump(value)
        message = str(info.value)
        assert type_name in message
        assert len(message) < 700  # the 500-char repr was truncated


def test_circular_structure_is_a_clear_error(ser: JsonSerializer) -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(SerializationError):
        ser.dumps(loop)
    with pytest.raises(SerializationError):
        "".join(ser.iter_dumps(loop))


def test_shared_substructure_is_fine(ser: JsonSerializer) -> None:
    shared = [cases_mod.Level.LOW]
    assert ser.dumps([shared, shared]) == json.dumps(
        [
            [
                {
                    "__pynenc__enum__": {
                        "module": "acall_serializer_cases",
                        "qualname": "Level",
                        "value": 1,
                    }
                }
            ]
        ]
        * 2
    )


# ------------------------------------------------------------------ safety of loads


class NotAnException:
    created = 0

    def __init__(self, *args: Any) -> None:
        NotAnException.created += 1


class NotAnEnum:
    def __init__(self, value: Any) -> None:
        raise AssertionError("must never be called")


class OnlyToJson:
    def to_json(self) -> Any:
        return 1


def _env(key: str, **fields: Any) -> str:
    return json.dumps({key: fields})


UNSAFE = [
    # builtin-exception envelope naming callables in builtins
    _env(
        "__pynenc__std_py_exc__", type="eval", args=["__import__('os').system('false')"], message=""
    ),
    _env("__pynenc__std_py_exc__", type="exec", args=["x=1"], message=""),
    _env("__pynenc__std_py_exc__", type="open", args=["/etc/passwd"], message=""),
    _env("__pynenc__std_py_exc__", type="__import__", args=["antigravity"], message=""),
    _env("__pynenc__std_py_exc__", type="dict", args=[], message=""),
    # exceptions a client must never be made to raise
    _env("__pynenc__std_py_exc__", type="SystemExit", args=[1], message=""),
    _env("__pynenc__std_py_exc__", type="KeyboardInterrupt", args=[], message=""),
    _env(
        "__pynenc__client_exception__",
        module="builtins",
        qualname="GeneratorExit",
        args=[],
        message="",
    ),
    # client-exception envelope naming functions, modules and non-exception classes
    _env(
        "__pynenc__client_exception__", module="os", qualname="system", args=["false"], message=""
    ),
    _env(
        "__pynenc__client_exception__",
        module="subprocess",
        qualname="Popen",
        args=[["false"]],
        message="",
    ),
    _env(
        "__pynenc__client_exception__", module="builtins", qualname="print", args=["x"], message=""
    ),
    _env("__pynenc__client_exception__", module="os", qualname="path", args=[], message=""),
    _env(
        "__pynenc__client_exception__",
        module="test_serializers",
        qualname="NotAnException",
        args=[],
        message="",
    ),
    # json-serializable envelope naming things without the protocol
    _env("__pynenc__json_serializable__", module="os", qualname="system", data="false"),
    _env("__pynenc__json_serializable__", module="builtins", qualname="dict", data={}),
    _env("__pynenc__json_serializable__", module="test_serializers", qualname="OnlyToJson", data=1),
    _env(
        "__pynenc__json_serializable__",
        module="test_serializers",
        qualname="NotAnException",
        data=1,
    ),
    # enum envelope naming non-enum classes and functions
    _env("__pynenc__enum__", module="builtins", qualname="eval", value="1+1"),
    _env("__pynenc__enum__", module="test_serializers", qualname="NotAnEnum", value=1),
    _env("__pynenc__enum__", module="os", qualname="system", value="false"),
    _env("__pynenc__enum__", module="sys", qualname="modules", value="x"),
]


@pytest.mark.parametrize("payload", UNSAFE)
def test_envelopes_naming_the_wrong_kind_are_refused(ser: JsonSerializer, payload: str) -> None:
    before = NotAnException.created
    with pytest.raises(UnsafePayloadError, match="refusing"):
        ser.loads(payload)
    with pytest.raises(UnsafePayloadError):
        ser.loads(json.dumps({"outer": [json.loads(payload)]}))
    assert NotAnException.created == before


@pytest.mark.parametrize(
    ("key", "fields"),
    [
        ("__pynenc__enum__", {"value": 1}),
        ("__pynenc__json_serializable__", {"data": {}}),
    ],
)
def test_modules_named_by_data_are_never_imported(
    ser: JsonSerializer, key: str, fields: dict[str, Any]
) -> None:
    name = "antigravity"
    assert name not in sys.modules
    payload = json.dumps({key: {"module": name, "qualname": "geohash", **fields}})
    with pytest.raises(DeserializationError, match="not imported"):
        ser.loads(payload)
    assert name not in sys.modules


def test_importable_modules_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acall_optin_mod.py").write_text(
        "import enum\nclass Kind(enum.Enum):\n    A = 'a'\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = json.dumps(
        {"__pynenc__enum__": {"module": "acall_optin_mod", "qualname": "Kind", "value": "a"}}
    )
    with pytest.raises(DeserializationError):
        JsonSerializer().loads(payload)
    value = JsonSerializer(importable_modules={"acall_optin_mod"}).loads(payload)
    assert type(value).__name__ == "Kind"
    monkeypatch.delitem(sys.modules, "acall_optin_mod")


def test_lookup_runs_no_module_getattr(
    ser: JsonSerializer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    mod = types.ModuleType("acall_lazy_mod")

    def __getattr__(name: str) -> Any:
        calls.append(name)
        return ValueError

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "acall_lazy_mod", mod)
    payload = json.dumps(
        {
            "__pynenc__client_exception__": {
                "module": "acall_lazy_mod",
                "qualname": "Lazy",
                "args": [],
                "message": "m",
            }
        }
    )
    assert isinstance(ser.loads(payload), RemoteTaskError)
    assert calls == []


def test_bad_envelope_fields_are_deserialization_errors(ser: JsonSerializer) -> None:
    bad = [
        {"__pynenc__enum__": {"module": 1, "qualname": "x", "value": 1}},
        {"__pynenc__enum__": {"module": "acall_serializer_cases", "qualname": "Level"}},
        {
            "__pynenc__enum__": {
                "module": "acall_serializer_cases",
                "qualname": "Level",
                "value": 99,
            }
        },
        {"__pynenc__enum__": "not an object"},
        {"__pynenc__std_py_exc__": {"type": "ValueError", "args": "no-list"}},
        {
            "__pynenc__json_serializable__": {
                "module": "acall_serializer_cases",
                "qualname": "Money",
            }
        },
        {
            "__pynenc__json_serializable__": {
                "module": "acall_serializer_cases",
                "qualname": "Money",
                "data": 5,
            }
        },
        {
            "__pynenc__client_exception__": {
                "module": "acall_serializer_cases",
                "qualname": "DetailedError",
                "args": [],
                "message": "",
            }
        },
    ]
    for doc in bad:
        with pytest.raises(DeserializationError):
            ser.loads(json.dumps(doc))


@pytest.mark.parametrize("text", ["", "{", "[1,", "nope", '"unterminated', "[" * 100_000])
def test_invalid_json_is_a_deserialization_error(ser: JsonSerializer, text: str) -> None:
    with pytest.raises(DeserializationError):
        ser.loads(text)


def test_loads_rejects_non_str(ser: JsonSerializer) -> None:
    with pytest.raises(DeserializationError):
        ser.loads(b"1")  # type: ignore[arg-type]


# --------------------------------------------------------------- end-to-end vectors


def _inline_cases() -> Iterator[dict[str, Any]]:
    for case in END_TO_END["cases"]:
        if not any(v.startswith(REFERENCE_PREFIX) for v in case["serialized_arguments"].values()):
            yield case


def test_end_to_end_inline_vectors(ser: JsonSerializer) -> None:
    cases = list(_inline_cases())
    assert cases
    for case in cases:
        serialized = {k: ser.dumps(v) for k, v in case["kwargs"].items()}
        assert serialized == case["serialized_arguments"]
        assert compute_args_id(serialized) == case["args_id"]


# ------------------------------------------------------------------------- pickle


def test_pickle_round_trip_and_pynenc_text_format() -> None:
    ser = PickleSerializer()
    value = {"a": (1, 2), "b": {3, 4}, "c": b"bytes"}
    text = ser.dumps(value)
    assert text == codecs.encode(pickle.dumps(value), "base64").decode()
    assert ser.loads(text) == value


def test_pickle_errors_are_acall_errors() -> None:
    ser = PickleSerializer()
    with pytest.raises(SerializationError):
        ser.dumps(lambda: 1)
    with pytest.raises(DeserializationError):
        ser.loads("not base64 pickle")


def test_pickle_is_documented_as_unsafe() -> None:
    assert PickleSerializer.__doc__ is not None
    assert "Unsafe for untrusted data" in PickleSerializer.__doc__


def _reference_dumps(obj: Any) -> str:
    """pynenc's algorithm as documented: wrap enums everywhere, then json.dumps."""

    def pre(o: Any) -> Any:
        if isinstance(o, Enum):
            cls = type(o)
            return {
                "__pynenc__enum__": {
                    "module": cls.__module__,
                    "qualname": cls.__qualname__,
                    "value": o.value,
                }
            }
        if isinstance(o, dict):
            return {k: pre(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [pre(i) for i in o]
        return o

    return json.dumps(pre(obj))


enum_members = st.sampled_from(
    [cases_mod.Level.LOW, cases_mod.Level.HIGH, cases_mod.Mode.FAST, cases_mod.Color.RED]
)
mixed_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | enum_members,
    lambda children: (
        st.lists(children, max_size=80)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=4), children, max_size=80)
    ),
    max_leaves=200,
)


@given(mixed_values)
def test_property_enums_anywhere_match_pynenc_algorithm(value: Any) -> None:
    ser = JsonSerializer()
    expected = _reference_dumps(value)
    assert ser.dumps(value) == expected
    small = JsonSerializer()
    small.chunk_chars = 16  # type: ignore[misc]
    assert "".join(small.iter_dumps(value)) == expected


@given(
    st.one_of(
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        st.text(max_size=70),
    )
)
def test_scalar_shortcuts_match_json(value: Any) -> None:
    ser = JsonSerializer()
    text = ser.dumps(value)
    assert text == json.dumps(value)
    loaded = ser.loads(text)
    expected = json.loads(text)
    assert type(loaded) is type(expected)
    assert loaded == expected or (loaded != loaded and expected != expected)  # NaN


@pytest.mark.parametrize(
    "text",
    ['"a\\"b"', '"\\u00e9"', "-0", "007", "1e5", "12345678901234567890", '"tab\\t"', '"x', "tru"],
)
def test_loads_shortcut_falls_back_exactly(text: str) -> None:
    ser = JsonSerializer()
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(DeserializationError):
            ser.loads(text)
        return
    assert ser.loads(text) == expected
    assert type(ser.loads(text)) is type(expected)


@given(st.text(max_size=70))
def test_loads_of_raw_unicode_strings(value: str) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert JsonSerializer().loads(text) == json.loads(text)


@pytest.mark.parametrize(
    "value",
    [
        '{"__pynenc__std_py_exc__": {"type": "ValueError", "args": ["x"]}}',
        "__pynenc__enum__" * 1000,
        ["__pynenc__json_serializable__"],
    ],
)
def test_text_that_only_mentions_an_envelope_loads_as_it_is(
    ser: JsonSerializer, value: Any
) -> None:
    assert ser.loads(ser.dumps(value)) == value


class Mode(IntFlag):  # IntFlag keeps any integer (boundary KEEP)
    READ = 1
    WRITE = 2
    EVERYTHING = -1  # a member all the same, outside the bits of the others


def test_flag_values_that_could_not_load_back_are_refused_at_dumps() -> None:
    """loads() rebuilds a Flag only from its members' bits (each other value would cache
    a new pseudo-member), so dumps() refuses the others up front: the submitter gets the
    error, not the worker that would have failed to load the argument."""
    s = JsonSerializer()
    both = Mode.READ | Mode.WRITE
    assert s.loads(s.dumps(both)) is both
    assert s.loads(s.dumps(Mode(0))) == Mode(0)
    assert s.loads(s.dumps(Mode.EVERYTHING)) is Mode.EVERYTHING
    for value in (Mode(8), Mode(9), [1, {"mode": Mode(4)}]):
        with pytest.raises(SerializationError, match="outside those of Mode's members"):
            s.dumps(value)
        with pytest.raises(SerializationError, match="outside those of Mode's members"):
            "".join(s.iter_dumps(value))
    # The negative member sets every bit of the class's own mask; loads still takes
    # only the other members' bits (each new value would cache a pseudo-member).
    envelope = {"module": __name__, "qualname": "Mode"}
    for number in (8, 2**70):
        with pytest.raises(DeserializationError, match="not a member"):
            s.loads(json.dumps({"__pynenc__enum__": {**envelope, "value": number}}))
