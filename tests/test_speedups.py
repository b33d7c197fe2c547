"""The native helpers (``acall._speedups``): the string escaper writes exactly what json
writes, and the tree walker tells plain values from the rest.

Large strings are escaped in pieces by :func:`acall._speedups.escape_ascii`, which runs
with the GIL released. Its output feeds the content key and args_id, so it must be
byte-identical to ``json.encoder.encode_basestring_ascii``: these tests compare the two on
every code point, on random ranges of strings of each internal width, and from several
threads at once; and check that the serializer falls back to the stdlib, with the same
output, where the extension is missing or disagrees.
"""

from __future__ import annotations

import collections
import decimal
import enum
import hashlib
import json
import os
import random
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring_ascii
from typing import Any

import pytest

from acall import serializers
from acall.serializers import JsonSerializer

if os.environ.get("CI"):
    # CI installs with a C compiler: the extension must have been built there.
    from acall import _speedups
else:
    _speedups = pytest.importorskip(
        "acall._speedups", reason="acall was installed without its C extension"
    )

escape_ascii = _speedups.escape_ascii


def _expected(text: str, start: int = 0, stop: int | None = None) -> str:
    return str(encode_basestring_ascii(text[start:stop]))[1:-1]


def test_every_code_point() -> None:
    # Controls, DEL, surrogates (lone ones included), the whole BMP and the astral planes.
    for first in range(0, 0x110000, 0x4000):
        text = "".join(map(chr, range(first, min(first + 0x4000, 0x110000))))
        assert escape_ascii(text) == _expected(text), hex(first)


def test_each_code_point_alone() -> None:
    # One character per call: the size pass and the writing pass agree on each.
    for code in [*range(0, 0x200), *range(0xD7F0, 0xE010), 0xFFFF, 0x10000, 0x10FFFF]:
        assert escape_ascii(chr(code)) == _expected(chr(code)), hex(code)


def _text(rng: random.Random, width: int, n: int) -> str:
    alphabet = {
        1: 'ab "\\\n\t\x00\x1f\x7f\xe9\xff',
        2: 'ab "\\\n\x01\x7f\xe9\u20ac\ud800\udfff\uffff',
        4: 'ab "\\\n\x02\u20ac\U0001f600\U0010ffff\ud83d',
    }[width]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_random_ranges_of_each_width(width: int) -> None:
    rng = random.Random(width)
    # 40,000 characters: above the size from which the GIL is released.
    text = _text(rng, width, 40_000)
    assert escape_ascii(text) == _expected(text)
    for _ in range(300):
        start = rng.randrange(len(text) + 1)
        stop = rng.randrange(start, len(text) + 1)
        assert escape_ascii(text, start, stop) == _expected(text, start, stop)
    assert escape_ascii(text, 7) == _expected(text, 7)


def test_ranges_are_checked() -> None:
    for start, stop in [(-1, 2), (3, 2), (0, 6)]:
        with pytest.raises(ValueError, match="bad range"):
            escape_ascii("hello", start, stop)
    with pytest.raises(TypeError, match="needs a str"):
        escape_ascii(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        escape_ascii()  # type: ignore[call-arg]
    assert escape_ascii("hello", 5, 5) == ""


def test_str_subclasses_are_escaped_by_their_characters() -> None:
    class Tagged(str):
        pass

    assert escape_ascii(Tagged('é"x')) == _expected('é"x')


def test_threads_escaping_at_once_get_their_own_text() -> None:
    rng = random.Random(9)
    texts = [_text(rng, width, 300_000) for width in (1, 2, 4, 2)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(escape_ascii, texts))
    assert results == [_expected(text) for text in texts]


def test_the_serializer_uses_it_for_large_strings() -> None:
    assert serializers._escape_range is escape_ascii
    text = _text(random.Random(3), 4, 3 * JsonSerializer.chunk_chars + 11)
    assert "".join(JsonSerializer().iter_dumps(text)) == json.dumps(text)


def test_the_stdlib_escaper_gives_the_same_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # What runs where the extension was not built.
    text = _text(random.Random(4), 2, 2 * JsonSerializer.chunk_chars + 5)
    native = list(JsonSerializer().iter_dumps(text))
    monkeypatch.setattr(serializers, "_escape_range", serializers._stdlib_escape_range)
    assert list(JsonSerializer().iter_dumps(text)) == native
    assert "".join(native) == json.dumps(text)


def _escaper_with(module: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "acall._speedups", module)
    return serializers._range_escaper()


def test_a_missing_or_disagreeing_extension_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = types.ModuleType("acall._speedups")
    wrong.escape_ascii = lambda text, start, stop: text[start:stop]  # type: ignore[attr-defined]
    assert _escaper_with(wrong, monkeypatch) is serializers._stdlib_escape_range
    assert _escaper_with(None, monkeypatch) is serializers._stdlib_escape_range
    assert _escaper_with(_speedups, monkeypatch) is escape_ascii


# --------------------------------------------------------------------- plain_tree

plain_tree = _speedups.plain_tree
NOT_PLAIN = serializers.NOT_PLAIN
NONFINITE_KEY = serializers.NONFINITE_KEY


class _Color(enum.IntEnum):
    RED = 1


class _Text(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        -(2**80),
        0.5,
        float("nan"),  # as a value it changes nothing
        "é",
        [],
        (),
        {},
        [1, (2.5, None), {"a": [True, {"b": "c"}]}],
        {1: "int key", 2.5: "float key", False: "bool key", None: "none key", "s": ()},
    ],
)
def test_exact_builtin_values_are_plain(value: Any) -> None:
    assert plain_tree(value) == 0


@pytest.mark.parametrize(
    "value",
    [
        _Color.RED,
        [1, {"nested": [_Color.RED]}],
        {_Color.RED: 1},
        [_Text("x")],
        {_Text("k"): 1},
        [collections.OrderedDict()],
        [collections.defaultdict(list)],
        [collections.UserList()],
        [b"bytes"],
        [bytearray()],
        [{1, 2}],
        [frozenset()],
        [1j],
        {(1, 2): "tuple key"},
        [object()],
        [decimal.Decimal(1)],
    ],
)
def test_anything_else_is_not_plain(value: Any) -> None:
    assert plain_tree(value) == NOT_PLAIN


@pytest.mark.parametrize("key", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_float_key_is_flagged(key: float) -> None:
    assert plain_tree({key: 1}) == NONFINITE_KEY
    assert plain_tree([[{"a": {key: None}}], {"b": 1.0}]) == NONFINITE_KEY
    assert plain_tree([{key: [object()]}]) == NOT_PLAIN  # not plain wins


def test_depth_and_cycles_are_left_to_the_exact_encoder() -> None:
    deep: list[Any] = []
    for _ in range(999):
        deep = [deep]
    assert plain_tree(deep) == 0
    assert plain_tree([deep]) == NOT_PLAIN
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    assert plain_tree(cyclic) == NOT_PLAIN
    looped: dict[str, Any] = {}
    looped["self"] = looped
    assert plain_tree(looped) == NOT_PLAIN


def test_the_serializer_uses_it() -> None:
    assert serializers._plain is plain_tree


def test_marshal_agrees_where_the_walker_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback: plain where the walker says plain (marshal also takes bytes and sets,
    # which the fast encoder then refuses), and a NaN key never missed.
    rng = random.Random(12)
    for _ in range(300):
        value: list[dict[Any, Any]] = [
            {"id": rng.randint(-5, 5), "s": rng.random(), "t": [None, True, "x"]}
            for _ in range(rng.randint(0, 40))
        ]
        if rng.random() < 0.3:
            value.append({rng.choice([float("nan"), float("inf")]): 1})
        native = plain_tree(value)
        assert native != NOT_PLAIN
        fallback = serializers._plain_by_marshal(value)
        assert fallback != NOT_PLAIN
        assert not native & NONFINITE_KEY or fallback & NONFINITE_KEY
        expected = json.dumps(value)
        assert JsonSerializer().dumps(value) == expected
        monkeypatch.setattr(serializers, "_plain", serializers._plain_by_marshal)
        assert JsonSerializer().dumps(value) == expected
        monkeypatch.undo()


def test_a_disagreeing_walker_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = types.ModuleType("acall._speedups")
    wrong.plain_tree = lambda obj: 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "acall._speedups", wrong)
    assert serializers._plain_checker() is serializers._plain_by_marshal
    monkeypatch.setitem(sys.modules, "acall._speedups", None)
    assert serializers._plain_checker() is serializers._plain_by_marshal
    monkeypatch.setitem(sys.modules, "acall._speedups", _speedups)
    assert serializers._plain_checker() is plain_tree


# ---------------------------------------------------------------------- args_text

args_text = _speedups.args_text


def _rule(args: dict[str, str]) -> bytes:
    """The canonical rule, written out: JSON(key)=JSON(value); in sorted key order."""
    return "".join(
        f"{json.dumps(k, ensure_ascii=False)}={json.dumps(args[k], ensure_ascii=False)};"
        for k in sorted(args)
    ).encode("utf-8")


def _random_args(rng: random.Random) -> dict[str, str]:
    alphabet = 'ab"\\\n\t\x00\x1f\x7f é€😀\U0010ffff\u2028'
    return {
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))): "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 40))
        )
        for _ in range(rng.randint(1, 12))
    }


def test_args_text_follows_the_rule() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        args = _random_args(rng)
        assert args_text(args) == _rule(args)


def test_args_text_on_every_code_point_but_surrogates() -> None:
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    args = {"all": text, text[:300]: "key"}
    assert args_text(args) == _rule(args)


def test_args_text_refuses_what_the_python_rule_must_report() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        args_text({"a": "\ud800"})
    with pytest.raises(ValueError, match="surrogate"):
        args_text({"\udfff": "a"})
    with pytest.raises(TypeError):
        args_text({"a": 1})
    with pytest.raises(TypeError):
        args_text({1: "a"})
    with pytest.raises(TypeError, match="needs a dict"):
        args_text(collections.OrderedDict(a="1"))
    with pytest.raises(TypeError, match="needs a dict"):
        args_text(types.MappingProxyType({"a": "1"}))


def test_str_subclasses_are_left_to_the_python_rule() -> None:
    # A subclass may compare, hash or equal in Python code, which could change the dict
    # between measuring and writing: the native path takes exact str only.
    from acall.hashing import compute_args_id

    class Backwards(str):
        def __lt__(self, other: object) -> bool:
            return str.__gt__(self, str(other))

    args: dict[str, str] = {Backwards("a"): "1", Backwards("b"): "2", Backwards("c"): "3"}
    with pytest.raises(TypeError, match="exact str"):
        args_text(args)
    with pytest.raises(TypeError, match="exact str"):
        args_text({"a": _Text("1")})
    # compute_args_id follows sorted() through the Python rule.
    assert _rule(args) == b'"c"="3";"b"="2";"a"="1";'
    assert compute_args_id(args) == hashlib.sha256(_rule(args)).hexdigest()


def test_args_ids_are_the_same_without_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from acall import hashing

    assert hashing._ARGS_TEXT is args_text
    rng = random.Random(6)
    cases = [_random_args(rng) for _ in range(300)]
    native = [hashing.compute_args_id(args) for args in cases]
    monkeypatch.setattr(hashing, "_ARGS_TEXT", None)
    assert [hashing.compute_args_id(args) for args in cases] == native


def test_args_ids_still_report_bad_arguments() -> None:
    from acall import SerializationError
    from acall.hashing import compute_args_id

    with pytest.raises(SerializationError):
        compute_args_id({"a": "\ud800"})
    with pytest.raises(SerializationError):
        compute_args_id({"a": 1})  # type: ignore[dict-item]


def test_a_key_that_could_change_the_dict_is_refused_before_it_runs() -> None:
    args: dict[str, str] = {}

    class Meddling(str):
        def __lt__(self, other: object) -> bool:
            args.pop("z", None)
            return str.__lt__(self, str(other))

        __hash__ = str.__hash__

    args.update({Meddling("m"): "1", Meddling("n"): "2", "z": "3"})
    with pytest.raises(TypeError, match="exact str"):
        args_text(args)
    assert "z" in args  # refused before any of its code ran


# ------------------------------------------------------------------------- is_key


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "0" * 256,
        "0" * 257,
        "",
        "ab-c_d.e:F9",
        "a b",
        "a/b",
        "é",
        "a\x00",
        "ab\u20ac",
        "a\n",
        5,
        None,
        b"abc",
        type("S", (str,), {})("sub-class.ok"),
    ],
)
def test_is_key_agrees_with_the_pattern(value: object) -> None:
    from acall.stores.base import KEY_PATTERN, is_key

    expected = isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None
    assert _speedups.is_key(value) is expected
    assert is_key is _speedups.is_key


def test_is_key_agrees_with_the_pattern_on_every_ascii_character() -> None:
    from acall.stores.base import KEY_PATTERN

    for code in range(256):
        text = f"a{chr(code)}b"
        assert _speedups.is_key(text) is (KEY_PATTERN.fullmatch(text) is not None), code


# ------------------------------------------------------------------------- SlotMaker


def test_records_deliveries_and_call_dtos_are_made_by_slot_makers() -> None:
    from acall.brokers.base import make_delivery
    from acall.dto import _new_call_dto, make_record

    for maker in (make_record, make_delivery, _new_call_dto):
        assert isinstance(maker, _speedups.SlotMaker)


def test_slot_constructor_keeps_the_class_where_a_maker_would_differ() -> None:
    import attrs

    from acall._slots import slot_constructor

    @attrs.frozen(slots=True)
    class Plain:
        a: int
        b: str = "b"

    @attrs.frozen(slots=True)
    class Converted:
        a: int = attrs.field(converter=int)

    @attrs.frozen(slots=True, cache_hash=True)
    class HiddenSlot:
        a: int

    made = slot_constructor(Plain, (1, "x"))
    assert isinstance(made, _speedups.SlotMaker)
    assert made(2, "y") == Plain(2, "y")
    assert slot_constructor(Plain, (1,)) is Plain  # a probe value short
    assert slot_constructor(Converted, ("7",)) is Converted  # "7" would stay a str
    assert slot_constructor(HiddenSlot, (1,)) is HiddenSlot  # its hash slot is no field


def test_slot_maker_fills_the_named_slots_in_order() -> None:
    class Point:
        __slots__ = ("__weakref__", "x", "y")
        x: Any
        y: Any

    make = _speedups.SlotMaker(Point, ("y", "x"))
    point = make(1, [2])
    assert type(point) is Point
    assert (point.x, point.y) == ([2], 1)
    before = sys.getrefcount(Point)
    points = [make(i, i) for i in range(100)]
    assert sys.getrefcount(Point) == before + 100  # each instance holds its type
    del points
    assert sys.getrefcount(Point) == before


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (("x", "x"), "distinct writable slot"),
        (("__weakref__",), "distinct writable slot"),
        (("missing",), "has no attribute"),
        ((1,), "names must be str"),
    ],
)
def test_slot_maker_refuses_what_is_not_a_slot(names: tuple[Any, ...], error: str) -> None:
    class Point:
        __slots__ = ("__weakref__", "x", "y")

    with pytest.raises((TypeError, AttributeError), match=error):
        _speedups.SlotMaker(Point, names)


def test_slot_maker_untracks_instances_that_hold_only_atoms_or_trusted_types() -> None:
    import enum
    import gc

    class Color(enum.Enum):
        RED = 1

    class Point:
        __slots__ = ("x", "y")
        x: Any
        y: Any

    keeps = _speedups.SlotMaker(Point, ("x", "y"))
    untracks = _speedups.SlotMaker(Point, ("x", "y"), (Color,))
    assert gc.is_tracked(Color.RED)
    assert gc.is_tracked(keeps(1, "a"))  # no acyclic: as the class makes it
    atoms: list[tuple[Any, Any]] = [(1, "a"), (None, 2.5), (Color.RED, b"x"), (untracks(1, 2), "a")]
    for values in atoms:
        assert not gc.is_tracked(untracks(*values)), values
    others: list[tuple[Any, Any]] = [([1], "a"), ({"k": []}, 2), (keeps(1, 2), 3), (Point, 1)]
    for values in others:
        assert gc.is_tracked(untracks(*values)), values  # might lead back: walked
    # An untracked instance is still freed by reference counting, with its values.
    value = "v" * 1000
    before = sys.getrefcount(value)
    held = untracks(untracks(value, 2), Color.RED)
    assert not gc.is_tracked(held)
    assert sys.getrefcount(value) == before + 1
    del held
    assert sys.getrefcount(value) == before
    with pytest.raises(TypeError, match="tuple of types"):
        _speedups.SlotMaker(Point, ("x", "y"), (1,))  # type: ignore[arg-type]


def test_the_invocation_path_objects_are_out_of_the_collectors_way() -> None:
    import gc

    from acall.brokers.base import make_delivery
    from acall.dto import ErrorInfo, InvocationStatus, make_call_dto, make_record
    from acall.ids import CallId, TaskId, make_call_id

    call = make_call_dto(make_call_id(TaskId("m", "f"), "0" * 64), {"x": "1"})
    fields: list[Any] = ["id", call, "q", InvocationStatus.PENDING, 0, 0, 1.0, 1.0]
    fields += [None, None, None, None, None, None, 1]
    record = make_record(*fields)
    for obj in (call.call_id, call, record, make_delivery("id", "q", "r", 1, record)):
        assert not gc.is_tracked(obj), obj
    fields[12] = ErrorInfo("E", "m")
    assert not gc.is_tracked(make_record(*fields))
    # A call id made by attrs' own constructor is tracked: what holds it stays tracked.
    fields[1] = make_call_dto(CallId(TaskId("m", "f"), "0" * 64), {"x": "1"})
    assert gc.is_tracked(fields[1].call_id)
    assert gc.is_tracked(fields[1])
    assert gc.is_tracked(make_record(*fields))


def test_slot_maker_refuses_a_wrong_call() -> None:
    class Point:
        __slots__ = ("x", "y")

    make = _speedups.SlotMaker(Point, ("x", "y"))
    with pytest.raises(TypeError, match="takes 2 arguments"):
        make(1)
    with pytest.raises(TypeError, match="positional arguments only"):
        make(1, y=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _speedups.SlotMaker(Point, ["x"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="distinct writable slot"):
        _speedups.SlotMaker(int, ("real",))
