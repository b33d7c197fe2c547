"""Fuzzing JsonSerializer.loads, and the no-code-execution corpus.

Property: any text either loads to plain data, enum members, exceptions and
``from_json()`` results (never a class, function or module), equal to ``json.loads``
when it holds no envelope, or raises DeserializationError (UnsafePayloadError for an
envelope naming the wrong kind of object) with a message saying what was wrong.

``tests/corpus/no_exec/`` holds payloads that try to run code: import a module, call a
function, instantiate a non-exception class, reach pickle, trigger ``__reduce__``,
``__setstate__``, descriptors or a module ``__getattr__``. Each is refused and the test
asserts the side effect did not happen (``acall_fuzz_events``, ``sys.modules``, files).
"""

from __future__ import annotations

import builtins
import enum
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import acall_fuzz_gadgets as gadgets
import acall_serializer_cases as cases
import pytest
from acall_fuzz_events import EVENTS
from fuzz_support import (
    FUZZ_MARKS,
    assert_useful_error,
    corpus_files,
    corpus_json,
    count,
    fuzz_settings,
    fuzz_summary,  # noqa: F401 - the module's summary fixture
    json_scalars,
    json_values,
    nasty_text,
    timed,
)
from hypothesis import example, given
from hypothesis import strategies as st

from acall import DeserializationError, JsonSerializer, RemoteTaskError, UnsafePayloadError
from acall.errors import AcallError
from acall.serializers import (
    ENUM_KEY,
    ERROR_KEY,
    EXCEPTION_KEY,
    JSON_SERIALIZABLE_KEY,
    PickleSerializer,
)

FUZZ_TARGETS = ["serializer", "no_exec"]
pytestmark = FUZZ_MARKS

ENVELOPES = [ERROR_KEY, EXCEPTION_KEY, JSON_SERIALIZABLE_KEY, ENUM_KEY]
_MENTIONS = ("JSON", "envelope", "exception", "member of", "from_json", "nested")
_SER = JsonSerializer()


def _allowed_leaf(value: Any) -> bool:
    """What a load may produce besides containers: data, never code or classes."""
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, enum.Enum | Exception):
        return True
    cls = type(value)
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType | types.ModuleType):
        return False
    # A from_json() result: an instance of a class with both halves of the protocol.
    return all(any(n in vars(base) for base in cls.__mro__) for n in ("to_json", "from_json"))


def _check_value(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            assert _allowed_leaf(item), f"loads produced {type(item).__name__}: {item!r:.200}"


def _same_json(a: Any, b: Any) -> bool:
    try:
        return json.dumps(a) == json.dumps(b)
    except RecursionError:
        return True  # too deep to compare this way; the value was checked above


def load(text: str, ser: JsonSerializer = _SER, *, target: str = "serializer") -> Any:
    """Load *text* and check the property; return the value or the error."""
    count(target)
    try:
        value = timed(lambda: ser.loads(text))
    except DeserializationError as exc:
        _check_error(exc)
        return exc
    except Exception as exc:
        raise AssertionError(
            f"JsonSerializer.loads leaked {type(exc).__name__}: {exc!r:.300}"
        ) from exc
    _check_value(value)
    if "__pynenc__" not in text:
        assert _same_json(value, json.loads(text))
    return value


def _check_error(exc: DeserializationError) -> None:
    assert_useful_error(exc, DeserializationError, *_MENTIONS)
    if isinstance(exc, UnsafePayloadError):
        assert "refusing" in str(exc)


# ------------------------------------------------------------- mutations of valid text

_members = st.sampled_from(
    [
        cases.Level.LOW,
        cases.Level.HIGH,
        cases.Mode.FAST,
        cases.Color.RED,
        cases.Color.GREEN,
        cases.Perm.R,
        cases.Perm.R | cases.Perm.W,
        cases.Outer.Inner.A,
    ]
)
_exceptions = st.one_of(
    st.builds(ValueError, nasty_text),
    st.builds(KeyError, json_scalars),
    st.builds(OSError, st.integers(0, 200), nasty_text),
    st.builds(cases.AppError, nasty_text, st.integers()),
    st.builds(cases.DetailedError, st.integers(), nasty_text),
)
_money = st.builds(cases.Money, st.floats(allow_nan=False), nasty_text)
rich_values = st.recursive(
    json_scalars | _members | _exceptions | _money,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=12,
)

_INSERTS = [
    '"',
    "\\",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "NaN",
    "-Infinity",
    "1e999",
    "9" * 5000,
    '"__pynenc__enum__"',
    '{"__pynenc__enum__": 1}',
    '"module": "os"',
    '"qualname": "system"',
    '"type": "eval"',
    "\x00",
    "\ud800",
]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """Text from *base*, then cuts, flips, splices, inserts and duplicated keys."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "splice", "dup", "swap"]))
        pos = draw(st.integers(0, len(text)))
        if op == "cut":
            text = text[:pos] + text[draw(st.integers(pos, len(text))) :]
        elif op == "flip" and pos < len(text):
            char = chr((ord(text[pos]) ^ (1 << draw(st.integers(0, 6)))) % 0x110000)
            text = text[:pos] + char + text[pos + 1 :]
        elif op == "insert":
            text = text[:pos] + draw(st.sampled_from(_INSERTS) | nasty_text) + text[pos:]
        elif op == "splice":
            other = draw(base)
            text = text[:pos] + other[draw(st.integers(0, len(other))) :]
        elif op == "dup":
            # Repeat a slice: often a duplicated key or a second envelope in one object.
            end = draw(st.integers(pos, min(len(text), pos + 80)))
            text = text[:end] + text[pos:end] + text[end:]
        elif op == "swap":
            for old, new in [("module", "qualname"), ("args", "value"), ("[", "{"), ('"', "'")]:
                if draw(st.booleans()):
                    text = text.replace(old, new, 1)
    return text


def _dumps(value: Any) -> str:
    return _SER.dumps(value)


@given(mutated(rich_values.map(_dumps)))
@fuzz_settings(2.0)
def test_mutated_serializer_output(text: str) -> None:
    load(text)


@given(rich_values)
@fuzz_settings(0.5)
def test_round_trip_of_rich_values(value: Any) -> None:
    text = _SER.dumps(value)
    loaded = load(text)
    assert not isinstance(loaded, DeserializationError), loaded
    assert _SER.dumps(loaded) == text


# --------------------------------------------------------------- structured envelopes

_MODULES = [
    "builtins",
    "os",
    "sys",
    "subprocess",
    "pickle",
    "copyreg",
    "importlib",
    "acall.serializers",
    "acall_serializer_cases",
    "acall_fuzz_gadgets",
    "acall_fuzz_trap_unimported",
    "acall_fuzz_trap_lazy",
    "antigravity",
    "this",
    "__main__",
    "os.path",
    "",
    ".",
    "..os",
    "acall_serializer_cases.",
    "a" * 10_000,
]
_QUALNAMES = [
    "system",
    "Popen",
    "loads",
    "eval",
    "exec",
    "open",
    "__import__",
    "getattr",
    "type",
    "object",
    "dict",
    "Exception",
    "BaseException",
    "SystemExit",
    "GeneratorExit",
    "ValueError",
    "Level",
    "Mode",
    "Color",
    "Color.RED",
    "Perm",
    "Outer.Inner",
    "Outer.Inner.A",
    "AppError",
    "DetailedError",
    "Money",
    "Money.from_json",
    "Money.__init__",
    "Level.__class__",
    "Level.__mro__",
    "Level.__subclasses__",
    "Level._missing_",
    "__class__",
    "__dict__",
    "__builtins__",
    "__spec__.loader",
    "__loader__",
    "NotAnException",
    "WithReduce",
    "WithReduce.__reduce__",
    "WithReduce.__setstate__",
    "Descriptors",
    "Descriptors.Boom",
    "Descriptors.factory",
    "Descriptors.__class_getitem__",
    "FromJsonOnly",
    "MetaFromJson",
    "Guarded",
    "Guarded.Inner",
    "sneaky",
    "sneaky.Boom",
    "sneaky.Kind",
    "callable_instance",
    "error_instance",
    "os_module.system",
    "subprocess_module.CalledProcessError",
    "Palette",
    "Palette.RED",
    "Boom",
    "Kind",
    "Box",
    "side_effect",
    "install_lazy_module",
    "a..b",
    "",
    ".",
    "x." * 5000,
]


@st.composite
def envelope_specs(draw: st.DrawFn) -> Any:
    """The object under an envelope key: right or wrong fields, right or wrong types."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not an object at all (truthy or not)
    spec: dict[str, Any] = {}
    fields = {
        "module": st.sampled_from(_MODULES) | nasty_text | json_scalars,
        "qualname": st.sampled_from(_QUALNAMES) | nasty_text | json_scalars,
        "type": st.sampled_from(sorted(vars(builtins))) | nasty_text | json_scalars,
        "args": st.lists(json_values, max_size=5) | json_values,
        "message": json_values,
        "value": st.sampled_from(["red", 1, 2, 4, 6, 10, "fast", 2**70, -1]) | json_values,
        "data": json_values | st.fixed_dictionaries({"amount": json_scalars}),
    }
    for name, strategy in fields.items():
        if draw(st.integers(0, 5)) > 0:
            spec[name] = draw(strategy)
    if draw(st.booleans()):
        spec[draw(nasty_text)] = draw(json_values)
    return spec


@st.composite
def envelope_documents(draw: st.DrawFn) -> Any:
    """One or more envelopes, possibly several in one object, nested in data."""
    doc: Any = {}
    for key in draw(st.lists(st.sampled_from(ENVELOPES), min_size=1, max_size=3)):
        doc[key] = draw(envelope_specs())
    if draw(st.booleans()):
        doc[draw(nasty_text)] = draw(json_values)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["list", "dict", "pair"]))
        key = draw(nasty_text)
        doc = [doc] if how == "list" else {key: doc} if how == "dict" else [1, {key: doc}]
    return doc


def _to_text(doc: Any) -> str | None:
    try:
        return json.dumps(doc)
    except (ValueError, RecursionError):
        return None


@given(envelope_documents())
@fuzz_settings(3.0)
@example({EXCEPTION_KEY: {"module": "acall_fuzz_gadgets", "qualname": "sneaky", "args": []}})
@example({ENUM_KEY: {"module": "acall_serializer_cases", "qualname": "Perm", "value": 2**80}})
def test_envelopes(doc: Any) -> None:
    before = len(EVENTS)
    modules = set(sys.modules)
    text = _to_text(doc)
    if text is not None:
        load(text)
    assert EVENTS[before:] == []
    assert set(sys.modules) <= modules | {"acall_fuzz_trap_lazy"}


@given(mutated(envelope_documents().map(lambda d: _to_text(d) or "{}")))
@fuzz_settings(1.0)
def test_mutated_envelopes(text: str) -> None:
    before = len(EVENTS)
    load(text)
    assert EVENTS[before:] == []


# ------------------------------------------------- every class the process could name


def _importable_name(cls: type) -> tuple[str, str] | None:
    module = sys.modules.get(cls.__module__)
    if module is None or "<" in cls.__qualname__:
        return None
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = vars(found).get(part) if isinstance(found, type | types.ModuleType) else None
    return (cls.__module__, cls.__qualname__) if found is cls else None


def _subclasses(root: type) -> list[tuple[str, str]]:
    seen: set[type] = set()
    stack = [root]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(type.__subclasses__(cls))
    names = {n for c in seen if (n := _importable_name(c)) is not None}
    return sorted(names)


def _resolve(module: str, qualname: str) -> Any:
    found: Any = sys.modules[module]
    for part in qualname.split("."):
        found = vars(found)[part]
    return found


@given(
    st.sampled_from(_subclasses(Exception)),
    st.lists(json_values | st.sampled_from([0, 1, 2, -1, 10**6, "", b"x".hex()]), max_size=6),
)
@fuzz_settings(3.0)
def test_every_exception_class_in_the_process(name: tuple[str, str], args: list[Any]) -> None:
    """Rebuilding any Exception subclass this process could name, with any arguments."""
    module, qualname = name
    text = _to_text({EXCEPTION_KEY: {"module": module, "qualname": qualname, "args": args}})
    if text is None:
        return
    value = load(text)
    if not isinstance(value, DeserializationError):
        assert isinstance(value, _resolve(module, qualname) | RemoteTaskError)


@given(
    st.sampled_from(_subclasses(enum.Enum)),
    st.sampled_from([0, 1, 2, 3, -1, 2**64, "", "a", "RED", None, [], {}]) | json_values,
)
@fuzz_settings(2.0)
def test_every_enum_class_in_the_process(name: tuple[str, str], value: Any) -> None:
    """Looking up a member of any Enum this process could name, with any value."""
    module, qualname = name
    text = _to_text({ENUM_KEY: {"module": module, "qualname": qualname, "value": value}})
    if text is None:
        return
    loaded = load(text)
    if not isinstance(loaded, DeserializationError):
        cls = _resolve(module, qualname)
        # A Flag with boundary EJECT returns a plain int for values outside its members.
        assert isinstance(loaded, cls) or (issubclass(cls, enum.Flag) and type(loaded) is int)


def test_flag_values_outside_the_members_are_refused() -> None:
    """Each distinct out-of-range Flag value would create and cache a new pseudo-member:
    memory that grows with every payload. Combinations of defined bits still load."""
    perm = {"module": "acall_serializer_cases", "qualname": "Perm"}
    assert load(json.dumps({ENUM_KEY: {**perm, "value": 6}})) == cases.Perm.R | cases.Perm.W
    for value in (1, 8, 2**80 + 4, -1, 4.0, True):
        loaded = load(json.dumps({ENUM_KEY: {**perm, "value": value}}))
        assert isinstance(loaded, DeserializationError), value
    regex = {"module": "re", "qualname": "RegexFlag"}
    import re

    cached = len(re.RegexFlag._value2member_map_)
    for i in range(50):
        load(json.dumps({ENUM_KEY: {**regex, "value": 2**3000 + i}}))
    assert len(re.RegexFlag._value2member_map_) == cached


# ------------------------------------------------------------ deep, long, huge inputs


@given(
    st.integers(1, 6000),
    st.sampled_from(["list", "dict", "args", "message", "spec"]),
    st.sampled_from(ENVELOPES),
)
@fuzz_settings(0.5)
@example(500, "list", ENUM_KEY)
@example(900, "dict", ERROR_KEY)
@example(400, "args", ERROR_KEY)
@example(400, "message", EXCEPTION_KEY)
def test_deep_nesting(depth: int, where: str, key: str) -> None:
    deep = "[" * depth + "]" * depth
    spec = {
        "module": "acall_no_such_module",
        "qualname": "X",
        "type": "NoSuchError",
        "args": [],
        "message": "m",
        "value": 1,
        "data": 1,
    }
    if where == "list":
        text = "[" * depth + json.dumps({key: spec}) + "]" * depth
    elif where == "dict":
        text = '{"a": ' * depth + json.dumps({key: spec}) + "}" * depth
    elif where == "spec":
        text = json.dumps({key: "SPEC"}).replace('"SPEC"', "[" * depth + "1" + "]" * depth)
    else:
        text = json.dumps({key: {**spec, where: "DEEP"}}).replace('"DEEP"', deep)
    load(text)


@pytest.mark.parametrize(
    "text",
    [
        "9" * 4301,
        "-" + "9" * 100_000,
        "1e99999",
        "[" + "1," * 200_000 + "1]",
        json.dumps({EXCEPTION_KEY: {"module": "m" * 1_000_000, "qualname": "q", "args": []}}),
        json.dumps({ENUM_KEY: {"module": "builtins", "qualname": "x." * 200_000, "value": 1}}),
        json.dumps({ERROR_KEY: {"type": "ValueError", "args": ["x" * 5_000_000]}}),
        json.dumps([{ENUM_KEY: {"module": "acall_serializer_cases", "qualname": "Level"}}] * 5000),
    ],
    ids=["int-4301", "int-100k", "exp", "list", "module", "qualname", "big-arg", "many"],
)
def test_long_inputs(text: str) -> None:
    load(text)


@given(st.text(max_size=300))
@fuzz_settings(0.3)
def test_random_text(text: str) -> None:
    load(text)


# ------------------------------------------------------------------------- corpora


def test_serializer_corpus_is_not_empty() -> None:
    assert len(corpus_files("serializer")) >= 10


@pytest.mark.parametrize("path", corpus_files("serializer"), ids=lambda p: p.name)
def test_serializer_corpus(path: Path) -> None:
    load(path.read_text(encoding="utf-8"))


NO_EXEC = list(corpus_json("no_exec"))


@pytest.fixture
def lazy_module() -> Iterator[types.ModuleType]:
    """``acall_fuzz_trap_lazy`` in sys.modules, its code not run yet."""
    module = gadgets.install_lazy_module()
    yield module
    sys.modules.pop(gadgets.LAZY_MODULE, None)


def test_no_exec_corpus_is_not_empty() -> None:
    assert len(NO_EXEC) >= 20
    for path, case in NO_EXEC:
        assert case.get("description"), f"{path.name} has no description"
        assert ("payload" in case) != ("text" in case), f"{path.name}: payload xor text"


# Every payload at top level, and nested inside a document too; raw-text payloads
# (not JSON documents) only at top level, as nesting means embedding a document.
_NO_EXEC_CASES: Final = [
    pytest.param(path, case, nested, id=f"{'nested' if nested else 'top'}-{path.name}")
    for nested in (False, True)
    for path, case in NO_EXEC
    if not nested or "payload" in case
]


@pytest.mark.parametrize(("path", "case", "nested"), _NO_EXEC_CASES)
def test_no_code_execution(
    path: Path, case: dict[str, Any], nested: bool, tmp_path: Path, lazy_module: types.ModuleType
) -> None:
    marker = tmp_path / "owned"
    raw = case["text"] if "text" in case else json.dumps(case["payload"])
    raw = raw.replace("{marker}", str(marker))
    if nested:
        raw = json.dumps({"args": [1, {"deep": [json.loads(raw)]}]})
    ser = JsonSerializer(importable_modules=case.get("importable_modules", ()))
    modules = set(sys.modules)
    events = len(EVENTS)

    result = load(raw, ser, target="no_exec")

    expect = case["expect"]
    if expect == "safe":
        pass  # refused or harmless data (load() checked which), depending on stack depth
    elif expect == "plain":
        _check_value(result)
        assert not isinstance(result, AcallError), result
    elif expect == "RemoteTaskError":
        found = result
        if nested:
            found = result["args"][1]["deep"][0]
        assert isinstance(found, RemoteTaskError), found
    else:
        kind = {"UnsafePayloadError": UnsafePayloadError, "DeserializationError": AcallError}
        assert isinstance(result, DeserializationError), f"{path.name} loaded {result!r:.200}"
        assert isinstance(result, kind[expect]), result
        if "message" in case:
            assert case["message"] in str(result), str(result)
    # The side effects did not happen: no event, no new module, no file.
    assert EVENTS[events:] == [], EVENTS[events:]
    assert set(sys.modules) == modules
    assert "acall_fuzz_trap_unimported" not in sys.modules
    assert not marker.exists()


def test_pickle_text_is_refused_by_the_default_serializer(tmp_path: Path) -> None:
    """The default loader has no path to pickle: a pickle is just text that is not JSON."""
    events = len(EVENTS)
    text = PickleSerializer().dumps(gadgets.WithReduce())  # __reduce__ runs here, on dumps
    assert EVENTS[events:] == ["WithReduce.__reduce__"]
    del EVENTS[events:]
    result = load(text, target="no_exec")
    assert isinstance(result, DeserializationError)
    assert "not valid JSON" in str(result)
    assert EVENTS[events:] == []
